"""Offline rehearsal of the Kaggle kernel route (issue 18): a kernel notebook run headless the way a
Kaggle kernel runs it, and checked. Two notebooks: `--notebook train` (kaggle/milk10k_kernel.ipynb,
the recipe 01 -> 05 on the sample) and `--notebook predict` (kaggle/predict_kernel.ipynb: a trained
bundle from tools/export_bundle.py scores a test release with 06_predict.py).

    nice -n 10 python tools/kaggle_rehearsal.py --wheels /tmp/wheels --work /tmp/kaggle_rehearsal
    nice -n 10 python tools/kaggle_rehearsal.py --notebook predict --bundle /tmp/bundle \
        [--test-data input/isic2024_test_sample] --wheels /tmp/wheels --work /tmp/kaggle_predict

1. wheels: `tools/make_wheels.sh` for the kernel's Python/platform (skipped when --wheels exists);
2. a fresh virtual environment holding only the "preinstalled" stand-ins a Kaggle image has (torch,
   torchvision, ipykernel and their dependencies, linked from this Python) — every other package must
   come from the wheels folder, installed by the notebook itself with `pip --no-index` (pip's own
   config files and PIP_* variables are cut off, so no index or local wheel cache is reachable);
3. the code (git-tracked files) and the data copied to read-only folders (chmod -R a-w); for the
   predict notebook the bundle and only the test files of the test release (`release_test_files`:
   MILK10k_Test_*, test-metadata.csv, test-image*, ...; default the sample's test release), so no
   training image is within the notebook's reach;
4. the notebook executed by nbclient in that venv with HOME, outputs and caches in a temporary writable
   folder and a network guard (sitecustomize.py: any non-loopback connect or name lookup is refused and
   logged; the run fails if the log is not empty);
5. checks: no cell failed, submission.csv written, code and data (bundle, test) trees unchanged (content hashes),
   nothing logged by the guard; prints install / run times (the notebook's timings.json).

The e2e tests tests/e2e/test_kaggle.py and tests/e2e/test_kaggle_predict.py use the same helpers in the
current environment (no wheels). Bad input (missing wheels folder given with --no-build, a predict
rehearsal without a bundle or test release) prints one line and exits 2 before anything is written.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib.core.errors import PipelineError  # noqa: E402
from tools._common import run_tool  # noqa: E402

NOTEBOOK = ROOT / "kaggle" / "milk10k_kernel.ipynb"
NOTEBOOKS = {"train": NOTEBOOK, "predict": ROOT / "kaggle" / "predict_kernel.ipynb"}
SAMPLE = ROOT / "input" / "milk10k_sample"
STANDIN_DISTS = ("torch", "torchvision", "ipykernel")
SETUP_STEPS = ("check output", "install", "check runtime")  # the notebook's steps before the stages

NET_GUARD = '''"""Network guard for the offline rehearsal: refuse and log any non-loopback connection or lookup."""
import os
import socket

_LOG = os.environ.get("NET_GUARD_LOG", "")
def _local(host):
    if host is None or isinstance(host, (bytes, bytearray)):
        return True
    host = str(host)
    return host in ("", "localhost", "::1", "0.0.0.0") or host.startswith("127.")


def _refuse(what, host):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{os.getpid()} {what} {host}\\n")
    raise OSError(f"network access blocked by the offline rehearsal: {what} {host}")


def _wrap(orig, what):
    def guarded(self, address, *a, **k):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(what, address[0])
        return orig(self, address, *a, **k)
    return guarded


_getaddrinfo = socket.getaddrinfo


def _guarded_getaddrinfo(host, *a, **k):
    if not _local(host):
        _refuse("getaddrinfo", host)
    return _getaddrinfo(host, *a, **k)


socket.socket.connect = _wrap(socket.socket.connect, "connect")
socket.socket.connect_ex = _wrap(socket.socket.connect_ex, "connect_ex")
socket.getaddrinfo = _guarded_getaddrinfo
'''


# ----------------------------------------------------------------------------- helpers shared with the test


def write_net_guard(folder: Path) -> Path:
    """A folder holding the guard as sitecustomize.py (put it first on PYTHONPATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(NET_GUARD)
    return folder


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha1 of content (or 'dir' / 'link:<target>') for everything under root."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"link:{os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def digest_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    added = [f"+{k}" for k in after if k not in before]
    removed = [f"-{k}" for k in before if k not in after]
    changed = [f"~{k}" for k in before if k in after and before[k] != after[k]]
    return added + removed + changed


def copy_read_only(src_files: list[Path], src_root: Path, dst: Path) -> Path:
    """Copy files (relative to src_root) to dst, then remove every write bit."""
    for f in src_files:
        target = dst / f.relative_to(src_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    make_read_only(dst)
    return dst


def _test_part(name: str) -> bool:
    n = name.lower()
    return n == "test" or n.startswith(("test-", "test_", "test.")) or "_test_" in n or "_test." in n


def release_test_files(release: Path) -> list[Path]:
    """The test side of a release folder: files with a path part named like a test split (MILK10k_Test_*,
    test-metadata.csv, test-image.hdf5, ISIC_2019_Test_*, test.csv + jpeg/test/); never the training files,
    held-out labels (held_out/, *GroundTruth*) or READMEs."""
    def wanted(rel: Path) -> bool:
        name = rel.name.lower()
        return (any(map(_test_part, rel.parts)) and "held_out" not in rel.parts and "groundtruth" not in name
                and not name.startswith("readme"))
    return sorted(f for f in release.rglob("*") if f.is_file() and wanted(f.relative_to(release)))


def predict_inputs(work: Path, bundle: Path, test: Path) -> dict[str, Path]:
    """Read-only copies for the inference kernel under work/input: code (git files), the bundle, and the
    test release's test files only."""
    files = release_test_files(test)
    if not files:
        raise PipelineError(f"{test} holds no test files (MILK10k_Test_*, test-metadata.csv, test-image*, ...)")
    return dict(code=copy_read_only(tracked_files(ROOT), ROOT, work / "input" / "code"),
                bundle=copy_read_only([f for f in bundle.rglob("*") if f.is_file()], bundle, work / "input" / "bundle"),
                test=copy_read_only(files, test, work / "input" / "test"))


def predict_params(inputs: dict[str, Path], work_dir: Path, wheels: Path | None, extra: list[str],
                   sklesion: str | None = None) -> dict[str, object]:
    """The predict notebook's parameters cell for these read-only inputs."""
    return dict(CODE_DIR=str(inputs["code"]), WHEELS_DIR=str(wheels) if wheels else None,
                BUNDLE_DIR=str(inputs["bundle"]), TEST_DIR=str(inputs["test"]), WORK_DIR=str(work_dir),
                SKLESION_WEIGHTS=sklesion, EXTRA_ARGS=list(extra))


def make_read_only(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o222)


def make_writable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod(stat.S_IMODE(p.stat().st_mode) | 0o200)


def tracked_files(repo: Path) -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    return [repo / n for n in names if n and (repo / n).is_file()]


def kernel_env(work: Path, guard: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The kernel's environment: HOME and caches under work, the guard first on PYTHONPATH, hub offline,
    pip's config files and PIP_* variables cut off (only --find-links folders are reachable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "JUPYTER", "VIRTUAL_ENV"))}
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), PYTHONPATH=str(guard), NET_GUARD_LOG=str(work / "net_guard.log"),
               HF_HUB_OFFLINE="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1",
               XDG_CACHE_HOME=str(home / ".cache"), TMPDIR=str(_mkdir(work / "tmp")), MPLBACKEND="Agg")
    env.update(extra or {})
    return env


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def notebook_with_params(params: dict[str, object], notebook: Path = NOTEBOOK):
    """The kernel notebook with its `parameters` cell replaced by these values (papermill-style)."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    return nb


def execute_notebook(nb, cwd: Path, env: dict[str, str], kernel_name: str = "python3",
                     timeout: int = 3600, out: Path | None = None):
    """Run every cell headless (nbclient); the executed notebook is written to `out` even on failure."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name,
                            resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(env=env, cwd=str(cwd))
    finally:
        if out is not None:
            import nbformat

            nbformat.write(nb, out)
    return nb


def cell_text(nb) -> str:
    """All stream/text output of the executed notebook (for assertions and logs)."""
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
    return "".join(parts)


# ----------------------------------------------------------------------------- the full rehearsal


def standin_dists(names: tuple[str, ...] = STANDIN_DISTS) -> list[importlib.metadata.Distribution]:
    """Installed distributions of `names` and their dependencies (extras followed), recursively."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    dists: dict[str, importlib.metadata.Distribution] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(n, "") for n in names]
    while todo:
        name, extra = todo.pop()
        name = canonicalize_name(name)
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            dist = dists.setdefault(name, importlib.metadata.distribution(name))
        except importlib.metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or r.marker.evaluate({"extra": extra}):
                todo += [(r.name, "")] + [(r.name, e) for e in r.extras]
    return list(dists.values())


def link_standins(dst: Path) -> int:
    """Symlink the stand-in distributions' top-level files into dst; returns how many."""
    dst.mkdir(parents=True, exist_ok=True)
    tops: set[Path] = set()
    for d in standin_dists():
        base = Path(d.locate_file(""))
        for f in d.files or []:
            if f.parts and f.parts[0] != "..":
                tops.add(base / f.parts[0])
    for t in sorted(tops):
        if t.exists() and not (dst / t.name).exists():
            (dst / t.name).symlink_to(t)
    return len(tops)


def make_venv(venv: Path, standins: Path) -> Path:
    """A fresh venv (its own pip only) that also sees the stand-ins through a .pth file; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "kaggle_preinstalled.pth").write_text(f"{standins}\n")
    return py


def write_kernelspec(jupyter_dir: Path, python: Path) -> str:
    """A kernelspec running ipykernel with `python`; returns its name (JUPYTER_PATH must hold jupyter_dir)."""
    spec = jupyter_dir / "kernels" / "kaggle-venv"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kaggle rehearsal venv", "language": "python"}))
    return "kaggle-venv"


def build_wheels(wheels: Path) -> float:
    t0 = time.time()
    subprocess.run(["bash", str(ROOT / "tools" / "make_wheels.sh"), str(wheels)], check=True)
    return time.time() - t0


def check_args(args: argparse.Namespace) -> None:
    """Bad input, found before anything is removed or written."""
    if not args.wheels.is_dir() and args.no_build:
        raise PipelineError(f"wheels folder {args.wheels} not found (drop --no-build to build it)")
    if args.notebook != "predict":
        return
    if args.bundle is None or not (args.bundle / "bundle.json").is_file():
        raise PipelineError(f"--bundle {args.bundle}: no bundle.json there (make one: python tools/export_bundle.py "
                            "output/<submit_exp> BUNDLE_DIR)")
    if not args.test_data.is_dir() or not release_test_files(args.test_data):
        raise PipelineError(f"--test-data {args.test_data}: no test release there (MILK10k_Test_*, test-metadata.csv, "
                            "test-image*, ...)")


def prepare(args: argparse.Namespace) -> dict:
    """Wheels, venv with stand-ins, read-only code and data (predict: bundle and test files); returns the paths."""
    work = args.work
    check_args(args)
    if work.exists():
        make_writable(work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if not args.wheels.is_dir():
        print(f"building wheels in {args.wheels}: {build_wheels(args.wheels):.0f} s", flush=True)
    n = link_standins(work / "preinstalled")
    python = make_venv(work / "venv", work / "preinstalled")
    if args.notebook == "predict":
        inputs = predict_inputs(work, args.bundle, args.test_data)
    else:
        inputs = dict(code=copy_read_only(tracked_files(ROOT), ROOT, work / "input" / "code"),
                      data=copy_read_only([p for p in SAMPLE.rglob("*") if p.is_file()], SAMPLE,
                                          work / "input" / "milk10k"))
    print(f"venv {python} with {n} preinstalled stand-in entries; read-only inputs {inputs}", flush=True)
    return dict(work=work, python=python, out=_mkdir(work / "working"), read_only=list(inputs), **inputs)


def notebook_params(args: argparse.Namespace, p: dict) -> dict[str, object]:
    if args.notebook == "predict":
        return predict_params(p, p["out"], args.wheels, args.extra)
    return dict(CODE_DIR=str(p["code"]), WHEELS_DIR=str(args.wheels), DATA_DIR=str(p["data"]),
                WORK_DIR=str(p["out"]), RECIPE=args.recipe, SKLESION_WEIGHTS=None, EXTRA_ARGS=args.extra)


def rehearse(args: argparse.Namespace) -> dict:
    p = prepare(args)
    work = p["work"]
    before = {k: tree_digest(p[k]) for k in p["read_only"]}
    os.environ["JUPYTER_PATH"] = str(work / "jupyter")
    os.environ["JUPYTER_RUNTIME_DIR"] = str(_mkdir(work / "jupyter_runtime"))
    kernel = write_kernelspec(work / "jupyter", p["python"])
    env = kernel_env(work, write_net_guard(work / "guard"))
    t0 = time.time()
    error = None
    try:
        execute_notebook(notebook_with_params(notebook_params(args, p), NOTEBOOKS[args.notebook]), p["out"], env,
                         kernel, out=work / "executed.ipynb")
    except Exception as e:  # noqa: BLE001 - reported below with the other checks
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    wall = time.time() - t0
    return check(p, before, wall, error)


def check(p: dict, before: dict, wall: float, error: str | None) -> dict:
    guard_log = p["work"] / "net_guard.log"
    problems = [f"notebook failed: {error}"] if error else []
    if guard_log.is_file() and guard_log.read_text().strip():
        problems.append(f"network access attempted: {guard_log.read_text().strip().splitlines()[:3]}")
    for k in before:
        changes = digest_changes(before[k], tree_digest(p[k]))
        if changes:
            problems.append(f"{k} folder written: {changes[:5]}")
    if not (p["out"] / "submission.csv").is_file():
        problems.append("no submission.csv in the working folder")
    timings_file = p["out"] / "timings.json"
    times = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    return dict(problems=problems, notebook_s=round(wall, 1), install_s=round(times.get("install", 0.0), 1),
                stages_s=round(sum(v for k, v in times.items() if k not in SETUP_STEPS), 1),
                times={k: round(v, 1) for k, v in times.items()}, executed=str(p["work"] / "executed.ipynb"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="offline rehearsal of the Kaggle kernel notebook")
    ap.add_argument("--wheels", type=Path, default=Path("/tmp/wheels"), help="made here when absent")
    ap.add_argument("--no-build", action="store_true", help="fail instead of building a missing wheels folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kaggle_rehearsal"))
    ap.add_argument("--notebook", choices=sorted(NOTEBOOKS), default="train",
                    help="train: kaggle/milk10k_kernel.ipynb; predict: kaggle/predict_kernel.ipynb (needs --bundle)")
    ap.add_argument("--recipe", default="configs/milk10k_sample", help="train notebook: the recipe folder")
    ap.add_argument("--bundle", type=Path, help="predict notebook: a bundle folder (tools/export_bundle.py)")
    ap.add_argument("--test-data", type=Path, default=SAMPLE,
                    help="predict notebook: a test release; only its test files are given to the notebook")
    ap.add_argument("--extra", nargs="*", default=[], help="config overrides for every stage (predict: runtime ones)")
    args = ap.parse_args(argv)
    args.wheels, args.work, args.test_data = args.wheels.resolve(), args.work.resolve(), args.test_data.resolve()
    args.bundle = args.bundle.resolve() if args.bundle else None
    return run_tool(lambda: report(rehearse(args)))


def report(res: dict) -> int:
    print(json.dumps(res, indent=1))
    print("REHEARSAL " + ("FAILED: " + "; ".join(res["problems"]) if res["problems"] else "PASSED"))
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
