"""Writes the two Kaggle notebooks from the cells below (edit here, then `python kaggle/build_notebook.py`;
tests/tools/test_kaggle_notebook.py fails when a committed notebook and this file disagree):
kaggle/milk10k_kernel.ipynb (train a recipe, 01 -> 05) and kaggle/predict_kernel.ipynb (score a test
release with a trained bundle, 06_predict.py); they share the setup, install and times cells."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).with_name("milk10k_kernel.ipynb")
PREDICT_NOTEBOOK = Path(__file__).with_name("predict_kernel.ipynb")
NOTEBOOKS = {"train": NOTEBOOK, "predict": PREDICT_NOTEBOOK}
PARAMETER_NAMES = ("CODE_DIR", "WHEELS_DIR", "DATA_DIR", "WORK_DIR", "RECIPE", "SKLESION_WEIGHTS", "EXTRA_ARGS")
PREDICT_PARAMETER_NAMES = ("CODE_DIR", "WHEELS_DIR", "BUNDLE_DIR", "TEST_DIR", "WORK_DIR", "SKLESION_WEIGHTS",
                           "EXTRA_ARGS")

INTRO = """# MILK10k skin-lesion pipeline in a Kaggle kernel (offline)

Runs the pipeline's five stages top to bottom without internet and ends with `submission.csv` in
the working folder. Attach three inputs (**Add data**):

| input | what | made by |
|---|---|---|
| code | this repository as a dataset (read-only) | upload the repo folder |
| wheels | every package except torch/torchvision (Kaggle's own are used) | `bash tools/make_wheels.sh /tmp/wheels` on a machine with internet, for the kernel's Python (3.11) |
| data | a MILK10k release (`MILK10k_Training_*` + `MILK10k_Test_*`) | competition / your dataset; leave `DATA_DIR = None` for the sample shipped in the code |
| (optional) sklesion weights | the converted sklesion Xception `.pth` (recipes with the sklesion encoder) | `python tools/kaggle_install.py export-sklesion --out skl-weights` (needs Keras 3) |

Nothing is written into `/kaggle/input`; every output, cache and converted weight goes under `WORK_DIR`.

**CPU or GPU.** `RECIPE` picks a recipe folder under `configs/`: `configs/milk10k_sample` (the
default: small models, a few minutes on CPU), `configs/milk10k_dev` (the full CPU recipe: lite0
fusion + lite0/sklesion stack, ~35 min on 2 cores for the dev set), `configs/milk10k_gpu` (the GPU
recipe: larger images, more epochs, AMP). With a GPU accelerator on, `device: auto` picks it; check it
first with `python tools/check_gpu.py`. Any config key can be overridden for every stage through
`EXTRA_ARGS`, e.g. `["device=cuda", "train.epochs=20"]`."""

PARAMS = """# Paths and choices: the only cell to edit. The offline rehearsal replaces it with local paths.
CODE_DIR = "/kaggle/input/skin-lesion-pipeline"   # the repository (read-only dataset)
WHEELS_DIR = "/kaggle/input/skl-wheels"           # tools/make_wheels.sh output; None = everything already installed
DATA_DIR = None                                   # a MILK10k release, e.g. "/kaggle/input/milk10k"; None = shipped sample
WORK_DIR = "/kaggle/working"                      # writable: output/, caches, submission.csv
RECIPE = "configs/milk10k_sample"                 # CPU: milk10k_sample | milk10k_dev; GPU: configs/milk10k_gpu
SKLESION_WEIGHTS = None                           # e.g. "/kaggle/input/skl-weights/sklesion-0.2.2_legacy_xception.pth"
EXTRA_ARGS = []                                   # config overrides for every stage, e.g. ["train.epochs=20"]"""

SETUP_MD = """## Setup
Resolves the paths, keeps every write under `WORK_DIR` (Python byte-code, converted weights, matplotlib
cache), turns off the one network call a package makes by itself (albumentations' update check), imports
the recipe plan (`lib/stages/plan.py`: which script runs with which recipe file, no ML import) and
defines `run()`, which streams a command's output into the cell and stops the notebook with the
command's last line when it fails (bad input exits with code 2 and one line)."""

SETUP_HEAD = """import json, os, subprocess, sys, time
from pathlib import Path

CODE, WORK = Path(CODE_DIR), Path(WORK_DIR)
OUT = WORK / "output"
os.environ["PYTHONPYCACHEPREFIX"] = str(WORK / ".pycache")      # never write .pyc into the code dataset
os.environ["SKL_CACHE_DIR"] = str(WORK / "weights_cache")       # converted weights live here
os.environ.setdefault("MPLCONFIGDIR", str(WORK / ".matplotlib"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")                     # no stage needs a hub
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")           # albumentations asks PyPI for updates at import
TIMES = {}


class StageFailed(Exception):
    pass


def run(name, *cmd):
    \"\"\"Run a command in the code folder, stream its output, record its time; stop on failure.\"\"\"
    cmd = [str(c) for c in cmd]
    print("$", " ".join(cmd), flush=True)
    t0, last = time.time(), ""
    with subprocess.Popen(cmd, cwd=CODE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            print(line, end="", flush=True)
            last = line.strip() or last
    TIMES[name] = TIMES.get(name, 0.0) + time.time() - t0
    print(f"--- {name}: {time.time() - t0:.1f} s", flush=True)
    if p.returncode != 0:
        raise StageFailed(f"{name} exited {p.returncode}: {last}")


"""

SETUP = SETUP_HEAD + """assert (CODE / "run_all.sh").is_file(), f"CODE_DIR {CODE} does not hold the repository"
sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"]           # the import below writes no .pyc into CODE
sys.path.insert(0, str(CODE))
from lib.stages.plan import plan_configs, recipe_plan            # the stage commands of a recipe folder
print(sys.version.split()[0], "| code", CODE, "| work", WORK, "| recipe", RECIPE)"""

INSTALL_MD = """## 1. Offline install
`tools/kaggle_install.py` checks the wheels folder (present, made for this Python and platform) and
runs `pip install --no-index --find-links WHEELS_DIR` (no index, no internet), then sklesion with
`--no-deps`. torch and torchvision are the kernel's own; so is ONNX Runtime (the CPU engine of the frozen
trunks) when the image has it at a version that fits `requirements.txt`, else it comes from the wheels.
`check-runtime` then imports ONNX Runtime and lists its providers. It also checks that `WORK_DIR` is
writable."""

INSTALL = """run("check output", sys.executable, "tools/kaggle_install.py", "check-output", OUT)
if WHEELS_DIR:
    run("install", sys.executable, "tools/kaggle_install.py", "install", "--wheels", WHEELS_DIR)
else:
    print("WHEELS_DIR = None: using the packages already installed")
run("check runtime", sys.executable, "tools/kaggle_install.py", "check-runtime")
import torch  # the preinstalled one
print("torch", torch.__version__, "| CUDA devices:", torch.cuda.device_count())"""

WEIGHTS_MD = """## 2. sklesion weights (only for recipes that use the sklesion encoder)
The sklesion Xception (HAM10000) ships as a Keras model; converting it needs Keras 3, which the kernel
does not have. Convert once elsewhere (`python tools/kaggle_install.py export-sklesion --out skl-weights`),
upload the folder as a dataset and set `SKLESION_WEIGHTS` to the file: it is linked into the weights
cache, where `weights: pypi:sklesion` finds it. Recipes without sklesion skip this."""

WEIGHTS = """# The steps this recipe runs (run_all.sh runs the same: python -m lib.stages.plan RECIPE lists them);
# only their files count (variant_*.yaml, ablations/ are options, not part of the recipe).
PLAN = recipe_plan(CODE / RECIPE)
uses_sklesion = any("pypi:sklesion" in f.read_text() for f in plan_configs(PLAN))
if SKLESION_WEIGHTS:
    run("sklesion weights", sys.executable, "tools/kaggle_install.py", "sklesion",
        "--file", SKLESION_WEIGHTS, "--cache", os.environ["SKL_CACHE_DIR"])
elif uses_sklesion:
    raise StageFailed(f"{RECIPE} uses the sklesion encoder but SKLESION_WEIGHTS is None: attach the converted "
                      "file (python tools/kaggle_install.py export-sklesion --out DIR, upload DIR) and set "
                      "SKLESION_WEIGHTS, or pick a recipe without sklesion (configs/milk10k_sample)")
else:
    print(f"{RECIPE} does not use sklesion: nothing to place")"""

PREP_MD = """## 3. Preprocess (`01_preprocess.py`)
Reads the release, validates it (bad input stops with one line naming the file and row), caches resized
images once, encodes metadata (fitted on train only) and writes `folds.csv`. Every later stage reads
these folds. The stage cells run the recipe's `PLAN` in order, each step with `--output`, `--data`
(when set) and `EXTRA_ARGS`."""

PREP = """ARGS = ["--output", OUT, *(["--data", DATA_DIR] if DATA_DIR else []), *EXTRA_ARGS]


def run_steps(*kinds):
    \"\"\"Run the plan's steps of these kinds (prepare, train, features, stack, submit) in plan order.\"\"\"
    for step in PLAN:
        if step.kind in kinds:
            run(step.name, sys.executable, *step.argv(ARGS))


run_steps("prepare")"""

TRAIN_MD = """## 4. Train the image models (`02_train_fold.py`, one run per `train_*.yaml`)
k-fold fine-tuning (the MILK10k recipes: dual-image fusion of the dermoscopic and clinical images with
metadata and MONET scores). Each fold's checkpoint is written atomically every epoch; a rerun skips
finished folds, so a kernel that timed out resumes where it stopped. On a GPU, AMP and channels_last are
on by default (`train.amp: auto`)."""

TRAIN = """run_steps("train")"""

STACK_MD = """## 5. Features and stacker (`03_extract_features.py`, `04_stack.py`, per `stack*.yaml`)
Frozen-encoder embeddings of both images (TTA-averaged, cached by encoder), then per-class XGBoost and
logistic regression on embeddings + MONET + metadata + the image models' out-of-fold probabilities,
nested on the same folds."""

STACK = """run_steps("features", "stack")   # 03 then 04 for each stack*.yaml"""

SUBMIT_MD = """## 6. Blend and submit (`05_submit.py`)
Blends the members with weights tuned on out-of-fold predictions, picks argmax or per-class thresholds,
writes the validated `submission.csv`, `report.md` and figures; the submission is copied to `WORK_DIR`.
On the shipped sample the held-out labels score it (`tools/score_submission.py`)."""

SUBMIT = """import shutil
import yaml

run_steps("submit")
base_yaml, submit_yaml = PLAN[0].config, PLAN[-1].config   # the plan starts with 01 on base.yaml, ends with 05
exp = yaml.safe_load(submit_yaml.read_text())["exp"]
shutil.copy2(OUT / exp / "submission.csv", WORK / "submission.csv")
truth, score = None, CODE / RECIPE / "score.txt"   # "<held-out truth under the recipe's data root> <exp>"
if score.is_file():
    rel = Path(score.read_text().split()[0])
    root = Path(yaml.safe_load(base_yaml.read_text())["data"]["root"])
    truth = CODE / rel if not DATA_DIR else Path(DATA_DIR) / rel.relative_to(root) if rel.is_relative_to(root) else None
if truth is not None and truth.is_file():
    run("score", sys.executable, "tools/score_submission.py", "--truth", truth,
        "--submission", WORK / "submission.csv", "--json", OUT / exp / "score.json")
else:
    print("no held-out labels for this data: not scored")"""

REPORT_MD = """## 7. Report
The cross-validation summary and the figures of `report.md` (confusion matrix, per-class F1, threshold
curves, training curves, fold spread), then the head of `submission.csv`."""

REPORT = """import pandas as pd
from IPython.display import Image, Markdown, display

cv = json.loads((OUT / exp / "cv.json").read_text())
print({k: v for k, v in cv.items() if not isinstance(v, (dict, list))})
for png in sorted((OUT / exp / "report").glob("*.png")):
    display(Markdown(f"**{png.stem}**"), Image(filename=str(png)))
sub = pd.read_csv(WORK / "submission.csv")
print(WORK / "submission.csv", sub.shape)
display(sub.head())"""

TIMES_MD = """## Times
Seconds per step of this run (also written to `WORK_DIR/timings.json`)."""

TIMES = """(WORK / "timings.json").write_text(json.dumps(TIMES, indent=1))
for name, sec in TIMES.items():
    print(f"{name:32s} {sec:8.1f} s")
print(f"{'total':32s} {sum(TIMES.values()):8.1f} s")"""


# ----------------------------------------------------------------------------- the inference kernel
# kaggle/predict_kernel.ipynb: a trained bundle (tools/export_bundle.py) scores a test release with
# 06_predict.py; it shares the setup, install and times cells above.

P_INTRO = """# Skin-lesion pipeline: inference kernel (a trained bundle, offline)

Scores a competition's test folder with a recipe trained elsewhere and leaves `submission.csv` in the
working folder, without internet and without the training data. Attach (**Add data**):

| input | what | made by |
|---|---|---|
| code | this repository as a dataset (read-only) | upload the repo folder |
| wheels | every package except torch/torchvision (Kaggle's own are used) | `bash tools/make_wheels.sh /tmp/wheels` on a machine with internet, for the kernel's Python (3.11) |
| bundle | a trained recipe: `bundle.json` + its safetensors / JSON / XGBoost / LightGBM files | `python tools/export_bundle.py output/<submit_exp> BUNDLE_DIR` after a training run (this repo's kernel `milk10k_kernel.ipynb`, `run_all.sh`, or any machine), upload `BUNDLE_DIR` |
| test data | the competition's test release, any layout the pipeline reads: ISIC 2024 (`test-metadata.csv` + `test-image.hdf5`), MILK10k (`MILK10k_Test_*`), ISIC 2019 / 2020 | the competition (**Add data**) |
| (optional) sklesion weights | the converted sklesion Xception `.pth` (bundles with the sklesion encoder) | `python tools/kaggle_install.py export-sklesion --out skl-weights` (needs Keras 3) |

One command does the work: `06_predict.py --bundle BUNDLE_DIR --test-data TEST_DIR --output WORK_DIR/output`
(bad input stops with one line naming the file and the problem). Nothing is written into
`/kaggle/input`; outputs, caches and converted weights go under `WORK_DIR`. `EXTRA_ARGS` passes runtime
overrides to it, e.g. `["threads=4"]` or `["device=cuda"]`; what the bundle learned is not changed by them."""

P_PARAMS = """# Paths and choices: the only cell to edit. The offline rehearsal replaces it with local paths.
CODE_DIR = "/kaggle/input/skin-lesion-pipeline"   # the repository (read-only dataset)
WHEELS_DIR = "/kaggle/input/skl-wheels"           # tools/make_wheels.sh output; None = everything already installed
BUNDLE_DIR = "/kaggle/input/skl-bundle"           # tools/export_bundle.py output (holds bundle.json)
TEST_DIR = "/kaggle/input/isic-2024-challenge"    # the test release: test-metadata.csv + test-image.hdf5, MILK10k_Test_*, ...
WORK_DIR = "/kaggle/working"                      # writable: output/, caches, submission.csv
SKLESION_WEIGHTS = None                           # e.g. "/kaggle/input/skl-weights/sklesion-0.2.2_legacy_xception.pth"
EXTRA_ARGS = []                                   # runtime overrides for 06_predict.py, e.g. ["threads=4"]"""

P_SETUP_MD = """## Setup
Resolves the paths, keeps every write under `WORK_DIR` (Python byte-code, converted weights, matplotlib
cache), turns off the one network call a package makes by itself (albumentations' update check) and
defines `run()`, which streams a command's output into the cell and stops the notebook with the
command's last line when it fails (bad input exits with code 2 and one line)."""

P_SETUP = SETUP_HEAD + """BUNDLE, TEST = Path(BUNDLE_DIR), Path(TEST_DIR)
assert (CODE / "06_predict.py").is_file(), f"CODE_DIR {CODE} does not hold the repository (no 06_predict.py)"
print(sys.version.split()[0], "| code", CODE, "| bundle", BUNDLE, "| test", TEST, "| work", WORK)"""

P_WEIGHTS_MD = """## 2. sklesion weights (only for bundles that use the sklesion encoder)
A bundle records its encoders' weights by identity and sha256, it does not carry them: packaged weights
come with the wheels, but the sklesion Xception needs Keras 3 to convert, so the converted `.pth` travels
as a dataset (`python tools/kaggle_install.py export-sklesion --out skl-weights`). `SKLESION_WEIGHTS`
links it into the weights cache; `06_predict.py` checks its sha256 against the bundle."""

P_WEIGHTS = """# The experiments' resolved configs in the bundle name every encoder's weights.
uses_sklesion = any("pypi:sklesion" in f.read_text() for f in sorted(BUNDLE.rglob("*.yaml")))
if SKLESION_WEIGHTS:
    run("sklesion weights", sys.executable, "tools/kaggle_install.py", "sklesion",
        "--file", SKLESION_WEIGHTS, "--cache", os.environ["SKL_CACHE_DIR"])
elif uses_sklesion:
    raise StageFailed(f"the bundle {BUNDLE} uses the sklesion encoder but SKLESION_WEIGHTS is None: attach the "
                      "converted file (python tools/kaggle_install.py export-sklesion --out DIR, upload DIR) "
                      "and set SKLESION_WEIGHTS")
else:
    print("the bundle does not use sklesion: nothing to place")"""

P_PREDICT_MD = """## 3. Predict (`06_predict.py`)
Reads the test release (its layout is recognised: ISIC 2024 HDF5, MILK10k, ISIC 2019 / 2020, ...),
checks it against the bundle (format, modalities, metadata columns), caches the test images under
`WORK_DIR/output`, runs the recipe's test side (fold models, frozen features, stackers, the blend and
the decision rule saved at training time) and writes the validated submission; it is copied to
`WORK_DIR/submission.csv`."""

P_PREDICT = """import shutil

run("06_predict", sys.executable, "06_predict.py", "--bundle", BUNDLE, "--test-data", TEST, "--output", OUT,
    *EXTRA_ARGS)
print("submission:", shutil.copy2(OUT / "predict" / "submission.csv", WORK / "submission.csv"))"""

P_REPORT_MD = """## 4. The model and the submission
The bundle's summary (`bundle.json`: data format, task, classes, the recipe's experiments), its model
card (what it was trained on, cross-validation and subgroup figures) with its plots, then the head of
`submission.csv`."""

P_REPORT = """import pandas as pd
from IPython.display import Image, Markdown, display

doc = json.loads((BUNDLE / "bundle.json").read_text())
data, recipe = doc.get("data", {}), doc.get("recipe", {})
print({k: data.get(k) for k in ("format", "task", "classes", "modalities")}, "| trained on", doc.get("n_train"),
      "| created", doc.get("created_utc"), "| experiments:", [f"{e['kind']} {e['exp']}" for e in recipe.get("experiments", [])])
card = BUNDLE / "model_card.md"
if card.is_file():
    display(Markdown(card.read_text()))
else:
    print("the bundle has no model_card.md")
for png in sorted(BUNDLE.glob("*.png")):
    display(Markdown(f"**{png.stem}**"), Image(filename=str(png)))
sub = pd.read_csv(WORK / "submission.csv")
print(WORK / "submission.csv", sub.shape)
display(sub.head())"""


def _notebook(cells: list) -> nbformat.NotebookNode:
    for i, c in enumerate(cells):
        c["id"] = f"cell-{i:02d}"
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata.update({"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                        "language_info": {"name": "python"}})
    return nb


def build() -> nbformat.NotebookNode:
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    return _notebook([md(INTRO), code(PARAMS, metadata={"tags": ["parameters"]}), md(SETUP_MD), code(SETUP),
                      md(INSTALL_MD), code(INSTALL), md(WEIGHTS_MD), code(WEIGHTS), md(PREP_MD), code(PREP),
                      md(TRAIN_MD), code(TRAIN), md(STACK_MD), code(STACK), md(SUBMIT_MD), code(SUBMIT),
                      md(REPORT_MD), code(REPORT), md(TIMES_MD), code(TIMES)])


def build_predict() -> nbformat.NotebookNode:
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    return _notebook([md(P_INTRO), code(P_PARAMS, metadata={"tags": ["parameters"]}), md(P_SETUP_MD),
                      code(P_SETUP), md(INSTALL_MD), code(INSTALL), md(P_WEIGHTS_MD), code(P_WEIGHTS),
                      md(P_PREDICT_MD), code(P_PREDICT), md(P_REPORT_MD), code(P_REPORT), md(TIMES_MD),
                      code(TIMES)])


def render(which: str = "train") -> str:
    return nbformat.writes(build_predict() if which == "predict" else build()) + "\n"


if __name__ == "__main__":
    for which, path in NOTEBOOKS.items():
        path.write_text(render(which))
        print(f"wrote {path}", file=sys.stderr)
