"""lib.data.cache: decode errors, resize modes, color constancy / CLAHE, the setting-specific cache folder,
idempotent reruns (up-to-date files untouched), error aggregation."""
from __future__ import annotations

import os
from pathlib import Path
import shutil
import time
from itertools import product

import numpy as np
import pytest
from PIL import Image

from lib.core.errors import PipelineError
from lib.data import cache
from tests.helpers import rgb, sample_derm_images, write_jpeg, write_truncated_jpeg

BASE = {"size": 32, "mode": "short_side", "clahe": False, "color_constancy": False, "quality": 90, "workers": 1}


def cfg(**kw) -> dict:
    return {**BASE, **kw}


# --------------------------------------------------------------------------- tag
def test_cache_tag_distinct_for_every_setting():
    variants = [cfg(size=s, mode=m, quality=q, clahe=c, color_constancy=sog)
                for s, m, q, c, sog in product([32, 64], ["short_side", "pad"], [80, 90], [False, True],
                                               [False, True])]
    tags = [cache.cache_tag(v) for v in variants]
    assert len(set(tags)) == len(tags)
    assert cache.cache_tag(cfg()) == "short_side32_q90"
    assert cache.cache_tag(cfg(mode="none", size=999, clahe=True)) == "original"
    assert cache.cache_tag(cfg(workers=8)) == cache.cache_tag(cfg())          # workers do not change the images


# --------------------------------------------------------------------------- decode
def test_read_rgb_modes(tmp_path):
    Image.fromarray(np.full((5, 7), 100, np.uint8), "L").save(tmp_path / "g.png")
    Image.fromarray(np.full((5, 7, 4), 200, np.uint8), "RGBA").save(tmp_path / "a.png")
    for name in ("g.png", "a.png"):
        x = cache.read_rgb(tmp_path / name)
        assert x.shape == (5, 7, 3) and x.dtype == np.uint8


def test_read_rgb_errors(tmp_path):
    with pytest.raises(PipelineError, match=r"image not found: .*nope\.jpg"):
        cache.read_rgb(tmp_path / "nope.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg" * 10)
    with pytest.raises(PipelineError, match=r"unreadable or corrupt image .*garbage\.jpg"):
        cache.read_rgb(tmp_path / "garbage.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(PipelineError, match=r"empty\.jpg"):
        cache.read_rgb(tmp_path / "empty.jpg")
    write_truncated_jpeg(tmp_path / "cut.jpg", sample_derm_images(1)[0])
    with pytest.raises(PipelineError, match=r"unreadable or corrupt image .*cut\.jpg"):
        cache.read_rgb(tmp_path / "cut.jpg")


# --------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("h, w", [(40, 60), (90, 30), (33, 33)])
def test_resize_modes(h, w):
    img = rgb(h, w)
    s = cache.resize(img, 20, "short_side")
    assert min(s.shape[:2]) == 20 and s.dtype == np.uint8
    assert abs(s.shape[0] / s.shape[1] - h / w) < 0.06
    p = cache.resize(img, 20, "pad")
    assert p.shape == (20, 20, 3) and p.dtype == np.uint8
    up = cache.resize(img, 120, "pad")
    assert up.shape == (120, 120, 3)


def test_pad_mode_centers_on_black():
    img = np.full((10, 40, 3), 200, np.uint8)          # landscape: bars above and below
    p = cache.resize(img, 40, "pad")
    assert p.shape == (40, 40, 3)
    assert p[:14].max() == 0 and p[-14:].max() == 0 and p[16:24].min() == 200


def test_shades_of_gray_and_clahe_keep_shape_dtype():
    img = rgb(30, 50, seed=3)
    for f in (cache.shades_of_gray, cache.clahe):
        out = f(img)
        assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(img, rgb(30, 50, seed=3))        # inputs untouched


def test_shades_of_gray_removes_a_color_cast():
    rng = np.random.default_rng(0)
    gray = rng.integers(60, 160, (32, 32, 1)).repeat(3, -1).astype(np.float32)
    cast = np.clip(gray * [1.3, 1.0, 0.7], 0, 255).astype(np.uint8)
    out = cache.shades_of_gray(cast).astype(float)
    before = np.ptp(cast.reshape(-1, 3).mean(0))
    after = np.ptp(out.reshape(-1, 3).mean(0))
    assert after < 0.25 * before


def test_clahe_raises_contrast_of_flat_image():
    rng = np.random.default_rng(0)
    flat = (120 + rng.integers(0, 10, (64, 64, 1))).repeat(3, -1).astype(np.uint8)
    assert cache.clahe(flat).std() > 1.5 * flat.std()


# --------------------------------------------------------------------------- build_cache
def jobs_for(tmp_path, n=4):
    srcs = [write_jpeg(tmp_path / "src" / f"{i}.jpg", 40 + 7 * i, 60, seed=i) for i in range(n)]
    return [(str(s), str(tmp_path / "cache" / f"{i}.jpg")) for i, s in enumerate(srcs)]


def test_build_cache_writes_resized_jpegs(tmp_path):
    jobs = jobs_for(tmp_path)
    cache.build_cache(jobs, cfg(size=24), workers=1)
    for src, dst in jobs:
        im = Image.open(dst)
        assert im.format == "JPEG" and min(im.size) == 24
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_build_cache_pad_gives_squares_with_processing(tmp_path):
    jobs = jobs_for(tmp_path)
    cache.build_cache(jobs, cfg(size=24, mode="pad", clahe=True, color_constancy=True), workers=1)
    for _, dst in jobs:
        assert Image.open(dst).size == (24, 24)


def test_build_cache_skips_up_to_date_files(tmp_path):
    jobs = jobs_for(tmp_path)
    past = time.time() - 100
    for src, _ in jobs:
        os.utime(src, (past, past))
    cache.build_cache(jobs, cfg(), workers=1)
    assert all(os.stat(d).st_mtime_ns == os.stat(s).st_mtime_ns for s, d in jobs)   # the source's stamp
    inode = {d: os.stat(d).st_ino for _, d in jobs}
    cache.build_cache(jobs, cfg(), workers=1)
    assert {d: os.stat(d).st_ino for _, d in jobs} == inode                        # nothing rewritten
    # another source at the same path (a new release) is cached again, newer or OLDER than the cached copy
    for i, when in ((1, past + 90), (2, past - 90)):
        os.utime(jobs[i][0], (when, when))
    cache.build_cache(jobs, cfg(), workers=1)
    after = {d: os.stat(d).st_ino for _, d in jobs}
    assert after[jobs[1][1]] != inode[jobs[1][1]] and after[jobs[2][1]] != inode[jobs[2][1]]
    assert all(after[d] == inode[d] for i, (_, d) in enumerate(jobs) if i not in (1, 2))


def test_an_older_image_under_the_same_name_replaces_the_cached_one(tmp_path):
    """A new test release whose image under a known id is older than the cached copy (the mtime rule
    `cached >= source` kept the stale copy): the cached bytes are those of the new image."""
    jobs = jobs_for(tmp_path)[:2]
    cache.build_cache(jobs, cfg(), workers=1)
    (src_a, dst_a), (src_b, _) = jobs
    first = Path(dst_a).read_bytes()
    shutil.copyfile(src_b, src_a)                  # another picture under the same name ...
    old = time.time() - 10_000
    os.utime(src_a, (old, old))                    # ... older than the cached copy
    cache.build_cache(jobs, cfg(), workers=1)
    assert Path(dst_a).read_bytes() != first
    assert Path(dst_a).read_bytes() == Path(jobs[1][1]).read_bytes()


def test_build_cache_workers_0_means_the_usable_cores(tmp_path, monkeypatch):
    def no_pool(n):
        raise AssertionError(f"a pool of {n} processes for 1 usable core")

    monkeypatch.setattr(cache, "cpu_count", lambda: 1)
    monkeypatch.setattr(cache, "ProcessPoolExecutor", no_pool)
    jobs = jobs_for(tmp_path, n=2)
    cache.build_cache(jobs, cfg(), workers=0)               # one usable core: decoded in this process
    assert all(os.path.exists(d) for _, d in jobs)
    monkeypatch.setattr(cache, "cpu_count", lambda: 3)
    with pytest.raises(AssertionError, match="a pool of 3 processes"):
        cache.build_cache(jobs_for(tmp_path / "b", n=2), cfg(), workers=0)


def test_build_cache_reports_every_bad_file(tmp_path):
    jobs = jobs_for(tmp_path, n=2)
    bad = []
    for i in range(7):
        p = tmp_path / "src" / f"bad{i}.jpg"
        p.write_bytes(b"garbage")
        bad.append((str(p), str(tmp_path / "cache" / f"bad{i}.jpg")))
    bad.append((str(tmp_path / "src" / "missing.jpg"), str(tmp_path / "cache" / "missing.jpg")))
    with pytest.raises(PipelineError) as e:
        cache.build_cache(jobs + bad, cfg(), workers=1)
    msg = str(e.value)
    assert msg.startswith("8 image(s) could not be cached")
    assert "bad0.jpg" in msg and "(+3 more)" in msg
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["0.jpg", "1.jpg"]   # no partial files


def test_process_one_returns_message_instead_of_raising(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"nope")
    msg = cache.process_one(str(tmp_path / "x.jpg"), str(tmp_path / "out.jpg"), cfg())
    assert "x.jpg" in msg and not (tmp_path / "out.jpg").exists()


def test_build_cache_process_pool_matches_serial(tmp_path):
    jobs = jobs_for(tmp_path, n=5)
    cache.build_cache(jobs, cfg(), workers=1)
    serial = [np.asarray(Image.open(d)) for _, d in jobs]
    jobs2 = [(s, d.replace("cache", "cache2")) for s, d in jobs]
    cache.build_cache(jobs2, cfg(), workers=2)
    for a, (_, d) in zip(serial, jobs2):
        assert np.array_equal(a, np.asarray(Image.open(d)))


def test_build_cache_mode_none_is_a_no_op(tmp_path):
    jobs = jobs_for(tmp_path, n=2)
    cache.build_cache(jobs, cfg(mode="none"), workers=1)
    assert not (tmp_path / "cache").exists()


def test_image_sha1_hashes_the_bytes_behind_every_kind_of_reference(tmp_path):
    import hashlib

    import h5py

    a, b = write_jpeg(tmp_path / "a.jpg", seed=1), write_jpeg(tmp_path / "b.jpg", seed=2)
    assert cache.image_sha1(a) == hashlib.sha1(a.read_bytes()).hexdigest() != cache.image_sha1(b)
    tiled = cache.image_sha1(f"{a}{cache.VIEW_SEP}{b}")
    assert tiled != cache.image_sha1(f"{b}{cache.VIEW_SEP}{a}") and len(tiled) == 40
    with h5py.File(tmp_path / "imgs.hdf5", "w") as f:
        f["x"] = np.frombuffer(a.read_bytes(), dtype=np.uint8)
    assert cache.image_sha1(f"{tmp_path / 'imgs.hdf5'}{cache.HDF5_SEP}x") == cache.image_sha1(a)
    with pytest.raises(PipelineError, match="image not found"):
        cache.image_sha1(tmp_path / "missing.jpg")
