"""Image cache: decode and resize each source image once (optional CLAHE / Shades of Gray), as JPEG."""
from __future__ import annotations

import hashlib
import io
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lib.core.errors import PipelineError
from lib.core.io import atomic_path
from lib.core.progress import progress
from lib.core.runtime import cpu_count

log = logging.getLogger(__name__)


def cache_tag(c: dict) -> str:
    """Folder name that encodes every setting, so a changed setting never reuses stale files."""
    if c["mode"] == "none":
        return "original"
    tag = f"{c['mode']}{c['size']}_q{c['quality']}"
    return tag + ("_clahe" if c["clahe"] else "") + ("_sog" if c["color_constancy"] else "")


HDF5_SEP = "::"   # `<file.hdf5>::<key>`: a JPEG stored as an HDF5 dataset (ISIC 2024 crops by isic_id)
VIEW_SEP = "|"    # `a.jpg|b.jpg|c.jpg`: several views of one case, tiled side by side (SCIN)


def _decode(data: bytes | str | Path, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise PipelineError(f"image not found: {name}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise PipelineError(f"unreadable or corrupt image {name}: {e}") from None


def read_hdf5_bytes(ref: str) -> bytes:
    """The encoded image stored under `<file.hdf5>::<key>`."""
    import h5py  # lazy: only HDF5 sources need it
    file, _, key = ref.rpartition(HDF5_SEP)
    try:
        with h5py.File(file, "r") as f:
            if key not in f:
                raise PipelineError(f"{file}: no image under key '{key}'")
            return bytes(np.asarray(f[key][()]).tobytes())
    except OSError as e:
        raise PipelineError(f"{file}: not a readable HDF5 file: {e}") from None


def tile_views(views: list[np.ndarray]) -> np.ndarray:
    """Views side by side at the height of the first (one picture per case)."""
    h = views[0].shape[0]
    out = [v if v.shape[0] == h else cv2.resize(v, (max(1, round(v.shape[1] * h / v.shape[0])), h),
                                                 interpolation=cv2.INTER_AREA) for v in views]
    return np.concatenate(out, axis=1)


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image fully as RGB uint8; corrupt or truncated files raise PipelineError.
    `path` may be `<file.hdf5>::<key>` or several views joined by `|` (tiled)."""
    p = str(path)
    if VIEW_SEP in p:
        return tile_views([read_rgb(v) for v in p.split(VIEW_SEP)])
    if HDF5_SEP in p:
        return _decode(read_hdf5_bytes(p), p)
    return _decode(p, p)


def image_sha1(ref: str | Path) -> str:
    """sha1 of the encoded bytes behind an image reference (a file, `<file.hdf5>::<key>`, or several
    views joined by `|`: the sha1 of their digests), the content fingerprint of one image."""
    p = str(ref)
    if VIEW_SEP in p:
        return hashlib.sha1(VIEW_SEP.join(image_sha1(v) for v in p.split(VIEW_SEP)).encode()).hexdigest()
    if HDF5_SEP in p:
        return hashlib.sha1(read_hdf5_bytes(p)).hexdigest()
    h = hashlib.sha1()
    try:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise PipelineError(f"image not found: {p}") from None
    return h.hexdigest()


def source_stamp(src: str) -> int:
    """The newest modification time (ns) of the file(s) behind a source reference: a cached copy carries
    its source's stamp as its own mtime, so any other source file at that path (newer or older: a new
    release) no longer matches it and is cached again."""
    files = [v.rpartition(HDF5_SEP)[0] if HDF5_SEP in v else v for v in str(src).split(VIEW_SEP)]
    try:
        return max(os.stat(f).st_mtime_ns for f in files)
    except FileNotFoundError as e:
        raise PipelineError(f"image not found: {e.filename}") from None


def shades_of_gray(img: np.ndarray, p: int = 6) -> np.ndarray:
    """Shades of Gray color constancy (Finlayson & Trezzi), Minkowski norm p."""
    x = img.astype(np.float32)
    norm = np.power(np.mean(np.power(x, p), axis=(0, 1)), 1.0 / p)
    gain = np.sqrt((norm ** 2).sum()) / (norm * np.sqrt(3) + 1e-6)
    return np.clip(x * gain, 0, 255).astype(np.uint8)


def clahe(img: np.ndarray, clip: float = 2.0, grid: int = 8) -> np.ndarray:
    """CLAHE on the L channel of LAB."""
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid)).apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def resize(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    """short_side: short side -> size, aspect kept; pad: long side -> size, centered on a square."""
    h, w = img.shape[:2]
    s = size / min(h, w) if mode == "short_side" else size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    out = cv2.resize(img, (nw, nh), interpolation=interp)
    if mode == "pad":
        canvas = np.zeros((size, size, 3), np.uint8)
        y0, x0 = (size - nh) // 2, (size - nw) // 2
        canvas[y0:y0 + nh, x0:x0 + nw] = out
        out = canvas
    return out


def complete_jpeg(path: str) -> bool:
    """A cached JPEG ends with its EOI marker (FF D9): one cut short (a full disk, an interrupted copy)
    does not, and is cached again instead of being read."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 4:
            return False
        f.seek(-2, os.SEEK_END)
        return f.read(2) == b"\xff\xd9"


def process_one(src: str, dst: str, c: dict) -> str | None:
    """Cache one image; returns an error message instead of raising (for the worker pool)."""
    try:
        stamp = source_stamp(src)
        if os.path.exists(dst) and os.stat(dst).st_mtime_ns == stamp and complete_jpeg(dst):
            return None
        img = read_rgb(src)
        if c["color_constancy"]:
            img = shades_of_gray(img)
        if c["clahe"]:
            img = clahe(img)
        img = resize(img, int(c["size"]), c["mode"])
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, int(c["quality"])])
        if not ok:
            return f"{src}: JPEG encoding failed"
        with atomic_path(dst) as tmp:
            tmp.write_bytes(buf.tobytes())
            os.utime(tmp, ns=(stamp, stamp))     # the source's stamp: what `stamp ==` checks next time
        return None
    except PipelineError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - report any decoder failure with its file
        return f"{src}: {type(e).__name__}: {e}"


def _star(args: tuple) -> str | None:
    return process_one(*args)


def build_cache(jobs: list[tuple[str, str]], c: dict, workers: int = 0) -> None:
    """Cache (src, dst) pairs in parallel with a progress bar; all errors reported together."""
    if c["mode"] == "none" or not jobs:
        return
    workers = workers or cpu_count()
    args = [(s, d, c) for s, d in jobs]
    errors: list[str] = []
    bar = progress(len(args), "cache images", unit="img", mininterval=1.0)
    if workers == 1:
        it = map(_star, args)
        for e in it:
            bar.update()
            if e:
                errors.append(e)
    else:
        with ProcessPoolExecutor(workers) as ex:
            for e in ex.map(_star, args, chunksize=16):
                bar.update()
                if e:
                    errors.append(e)
    bar.close()
    if errors:
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise PipelineError(f"{len(errors)} image(s) could not be cached: " + "; ".join(errors[:5]) + more)
