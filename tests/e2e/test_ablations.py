"""Every ablation config (configs/<recipe>/ablations/*.yaml, docs/ablations.md) runs, so none rots.

Each file runs its own stage on a shipped sample with tiny settings: `train_*` through 02, `stack_*`
through 03 + 04, `submit_*` through 05. The experiments it reads (stack.oof_exps, features.from_exps,
stack.features_exp, submit.members) are made first by the recipe file that names them, once per module.
The stages run in this process (the scripts' own `run_script`), which saves an interpreter start per
stage. Tiny means: 3 folds, 64 px, 1 epoch, few trees; every encoder and image model keeps its arch,
cut, views and fine-tune keys but starts from random weights (`weights: null`): the configs' keys,
cuts and chains are what is checked here; the weights' loading and conversion are tested in
tests/vision (test_weights.py, test_keras_convert.py), so no sklesion conversion is needed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lib.config.load import load_config
from tests.helpers import load_file

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
ABLATIONS = sorted(CONFIGS.glob("*/ablations/*.yaml"))
SAMPLES = {"milk10k_dev": "input/milk10k_sample", "milk10k_sample": "input/milk10k_sample",
           "ham10000_dev": "input/ham10000_sample", "isic2024_ham_dev": "input/isic2024_ham_sample"}
COMMON = ["cache.size=64", "folds.n_splits=3", "threads=2"]
SCRIPTS = {"01": "01_preprocess.py", "02": "02_train_fold.py", "03": "03_extract_features.py",
           "04": "04_stack.py", "05": "05_submit.py"}
HAM_TO_ISIC2019 = {"mel": "MEL", "nv": "NV", "bcc": "BCC", "bkl": "BKL", "df": "DF", "vasc": "VASC"}


def make_isic2019_from_ham(dst: Path) -> Path:
    """The shipped HAM10000 sample laid out as an ISIC 2019 release (akiec split into AK and SCC)."""
    ham = ROOT / "input" / "ham10000_sample"
    train = pd.read_csv(ham / "HAM10000_metadata.csv").sort_values("image_id")
    akiec = (train["dx"] == "akiec").cumsum()
    train["cls"] = [HAM_TO_ISIC2019.get(d) or ("AK" if k % 2 else "SCC") for d, k in zip(train["dx"], akiec)]
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    for tag, df in (("Training", train), ("Test", pd.read_csv(ham / "HAM10000_test_metadata.csv"))):
        folder = dst / f"ISIC_2019_{tag}_Input"
        folder.mkdir(parents=True)
        for i in df["image_id"]:
            shutil.copy2(ham / "images" / f"{i}.jpg", folder / f"{i}.jpg")
        meta = pd.DataFrame({"image": df["image_id"], "age_approx": df["age"],
                             "anatom_site_general": df["localization"], "sex": df["sex"]})
        if tag == "Training":
            meta["lesion_id"] = df["lesion_id"].to_numpy()
            gt = pd.DataFrame({"image": df["image_id"], **{c: (df["cls"] == c).astype(float) for c in classes}})
            gt.to_csv(dst / "ISIC_2019_Training_GroundTruth.csv", index=False)
        meta.to_csv(dst / f"ISIC_2019_{tag}_Metadata.csv", index=False)
    return dst


def _tiny_encoders(cfg: dict) -> str:
    """The config's encoders (names, archs, cuts, views, fine-tune keys) at 64 px from random weights."""
    encs = []
    for e in cfg["features"]["encoders"]:
        ft = dict(e["finetune_with"])
        if ft.get("epochs") is not None:
            ft["epochs"] = 1
        encs.append({**e, "weights": None, "size": 64, "finetune_with": ft})
    return "features.encoders=" + json.dumps(encs)


def _tiny(stage: str, cfg: dict) -> list[str]:
    if stage == "02":
        return ["train.img_size=64", "train.epochs=1", "train.batch_size=16", "train.model.weights=null",
                "train.val_every=0", "train.workers=0"]
    if stage in ("03", "04"):
        return [_tiny_encoders(cfg), "features.finetune.epochs=1", "features.workers=0",
                "stack.xgb.n_estimators=20", "stack.lgbm.n_estimators=20", "stack.pca_components=4"]
    return []


def _stages(path: Path) -> list[str]:
    name = path.name
    if name.startswith("train_"):
        return ["02"]
    if name.startswith("stack"):
        return ["03", "04"]
    if name.startswith("submit"):
        return ["05"]
    raise AssertionError(f"{path}: an ablation's name starts with train_, stack_ or submit_ (its stage)")


def _needs(cfg: dict) -> list[str]:
    """The experiments a config reads."""
    own = [cfg["stack"]["features_exp"]] if cfg["stack"]["features_exp"] not in (None, cfg["exp"]) else []
    return [*cfg["stack"]["oof_exps"], *cfg["features"]["from_exps"], *own,
            *(m["exp"] for m in cfg["submit"]["members"])]


class Runner:
    """Runs recipe files on a sample, once each, producing what they read first."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.done, self.data = tmp, set(), {}
        self.scripts = {k: load_file(ROOT / v, f"stage_{k}") for k, v in SCRIPTS.items()}

    def _args(self, recipe: str) -> list[str]:
        """The sample's flags for this recipe; its 01 runs the first time."""
        first = recipe not in self.data
        if first:
            self.data[recipe] = (str(make_isic2019_from_ham(self.tmp / "isic2019")) if recipe == "isic2019_dev"
                                 else SAMPLES[recipe])
        args = ["--data", self.data[recipe], "--output", str(self.tmp / recipe), *COMMON]
        if first:
            self._stage("01", CONFIGS / recipe / "base.yaml", args)
        return args

    def _stage(self, stage: str, path: Path, args: list[str], cfg: dict | None = None) -> None:
        mod = self.scripts[stage]
        argv = ["-c", str(path), *args, *_tiny(stage, cfg or {})]
        rc = mod.run_script(mod.main, argv, mod.__doc__, getattr(mod, "EXTRA", None))
        assert rc == 0, f"{SCRIPTS[stage]} -c {path.relative_to(ROOT)} failed (exit {rc}; its error is above)"

    def _producer(self, recipe: str, exp: str) -> Path:
        for f in [*sorted((CONFIGS / recipe).glob("*.yaml")), *sorted((CONFIGS / recipe).glob("ablations/*.yaml"))]:
            if f.name != "base.yaml" and load_config(f)["exp"] == exp:
                return f
        raise AssertionError(f"configs/{recipe}: no file makes experiment {exp!r}")

    def run(self, path: Path) -> dict:
        """Run one recipe file (after the experiments it reads), once."""
        cfg = load_config(path)
        if path not in self.done:
            recipe = path.relative_to(CONFIGS).parts[0]
            args = self._args(recipe)
            for exp in _needs(cfg):
                self.run(self._producer(recipe, exp))
            for stage in _stages(path):
                self._stage(stage, path, args, cfg)
            self.done.add(path)
        return cfg


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Runner:
    return Runner(tmp_path_factory.mktemp("ablations"))


def test_every_recipe_with_ablations_has_a_sample() -> None:
    recipes = {p.parent.parent.name for p in ABLATIONS}
    assert recipes <= {*SAMPLES, "isic2019_dev"}, recipes - {*SAMPLES, "isic2019_dev"}


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_ablation_runs_on_the_sample(runner: Runner, path: Path) -> None:
    cfg = runner.run(path)
    recipe = path.relative_to(CONFIGS).parts[0]
    out = runner.tmp / recipe / cfg["exp"]
    expected = {"02": ["oof.parquet", "test.parquet", "cv.json"], "03": [], "04": ["oof.parquet", "test.parquet",
                "cv.json"], "05": ["submission.csv", "cv.json"]}
    for stage in _stages(path):
        for f in expected[stage]:
            assert (out / f).is_file(), f"{path.relative_to(ROOT)}: {stage} left no {cfg['exp']}/{f}"
    assert json.loads((out / "cv.json").read_text())["exp"] == cfg["exp"]
