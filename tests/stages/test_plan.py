"""lib/stages/plan.py: the ordered stage commands of a recipe folder (top-level files only), its command
line (one shell-quoted command per line, no ML import), and run_all.sh running exactly that plan."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lib.core.errors import ConfigError
from lib.stages.plan import plan_configs, plan_lines, recipe_plan

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path: Path, *names: str) -> Path:
    r = tmp_path / "recipe"
    for n in names:
        (r / n).parent.mkdir(parents=True, exist_ok=True)
        (r / n).write_text("seed: 1\n")
    return r


FULL = ("base.yaml", "submit.yaml", "train_b.yaml", "train_a.yaml", "stack_ft.yaml", "stack.yaml", "score.txt",
        "variant_stack_x.yaml", "variant_train_y.yaml", "ablations/train_z.yaml", "ablations/stack.yaml",
        "ablations/base.yaml", "notes.md")


def test_order_kinds_and_only_top_level_files(tmp_path: Path) -> None:
    r = _recipe(tmp_path, *FULL)
    (r / "train_dir.yaml").mkdir()  # a folder with a matching name is not a config
    steps = recipe_plan(r)
    assert [(s.kind, s.config.name) for s in steps] == [
        ("prepare", "base.yaml"), ("train", "train_a.yaml"), ("train", "train_b.yaml"),
        ("features", "stack.yaml"), ("stack", "stack.yaml"), ("features", "stack_ft.yaml"),
        ("stack", "stack_ft.yaml"), ("submit", "submit.yaml")]
    assert all(s.config.parent == r for s in steps)
    assert [s.script for s in steps][::len(steps) - 1] == ["01_preprocess.py", "05_submit.py"]
    assert [s.name for s in steps[2:5]] == ["02_train train_b", "03_features stack", "04_stack stack"]
    assert steps[0].name == "01_preprocess" and steps[-1].name == "05_submit"
    assert [p.name for p in plan_configs(steps)] == ["base.yaml", "train_a.yaml", "train_b.yaml", "stack.yaml",
                                                     "stack_ft.yaml", "submit.yaml"]


def test_stack_only_recipe_and_argv(tmp_path: Path) -> None:
    r = _recipe(tmp_path, "base.yaml", "stack.yaml", "submit.yaml")
    steps = recipe_plan(r)
    assert [s.script for s in steps] == ["01_preprocess.py", "03_extract_features.py", "04_stack.py", "05_submit.py"]
    assert steps[1].argv(["--data", "x y"]) == ["03_extract_features.py", "-c", str(r / "stack.yaml"), "--data", "x y"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").iterdir() if p.is_dir()))
def test_every_shipped_recipe_has_a_plan_of_existing_files(recipe: str) -> None:
    steps = recipe_plan(ROOT / "configs" / recipe)
    assert steps[0].kind == "prepare" and steps[-1].kind == "submit"
    assert all(s.config.is_file() and not s.config.name.startswith("variant_") for s in steps)


def test_shipped_sample_plan() -> None:
    assert plan_lines("configs/milk10k_sample") == [
        "01_preprocess.py -c configs/milk10k_sample/base.yaml",
        "02_train_fold.py -c configs/milk10k_sample/train_fusion.yaml",
        "03_extract_features.py -c configs/milk10k_sample/stack.yaml",
        "04_stack.py -c configs/milk10k_sample/stack.yaml",
        "05_submit.py -c configs/milk10k_sample/submit.yaml"]


@pytest.mark.parametrize("names, missing", [((), "recipe folder"), (("submit.yaml",), "no base.yaml"),
                                            (("base.yaml", "stack.yaml"), "no submit.yaml")])
def test_incomplete_recipe_is_a_config_error(tmp_path: Path, names: tuple, missing: str) -> None:
    r = _recipe(tmp_path, *names) if names else tmp_path / "nope"
    with pytest.raises(ConfigError, match=missing):
        recipe_plan(r)


def test_line_break_in_an_argument_is_refused(tmp_path: Path) -> None:
    r = _recipe(tmp_path, "base.yaml", "submit.yaml")
    with pytest.raises(ConfigError, match="line break"):
        plan_lines(r, ["a=1\nb=2"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lib.stages.plan", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_cli_prints_one_quoted_command_per_line_with_the_extra_args(tmp_path: Path) -> None:
    r = _recipe(tmp_path, "base.yaml", "train_a.yaml", "stack.yaml", "submit.yaml")
    extra = ["--data", "a folder/with space", "features.encoders=[{name: x, size: 64}]", "$(echo no)"]
    p = _cli(str(r), *extra)
    assert p.returncode == 0, p.stderr
    got = [shlex.split(line) for line in p.stdout.splitlines()]
    assert got == [s.argv(extra) for s in recipe_plan(r)]


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path: Path) -> None:
    p = _cli(str(tmp_path / "nope"))
    assert p.returncode == 2 and p.stdout == ""
    err = p.stderr.strip()
    assert err.startswith("error: recipe folder") and "\n" not in err and "Traceback" not in err
    assert _cli().returncode == 2


def test_plan_imports_no_ml_library() -> None:
    code = ("import sys\nimport lib.stages.plan\nheavy = [m for m in ('torch', 'numpy', 'pandas', 'yaml', 'sklearn',"
            " 'xgboost', 'lightgbm', 'cv2', 'timm') if m in sys.modules]\nprint(heavy)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A PYTHON for run_all.sh: `-m` runs the real interpreter (the plan), a script call is only logged."""
    log, fake = tmp_path / "calls.jsonl", tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then exec "{sys.executable}" "$@"; fi\n'
                    f'exec "{sys.executable}" -c "import json, sys; open(sys.argv[1], \'a\').write('
                    f'json.dumps(sys.argv[2:]) + chr(10))" "{log}" "$@"\n')
    fake.chmod(0o755)
    return fake, log


def test_run_all_runs_the_plan_in_order_with_every_extra_arg(tmp_path: Path) -> None:
    r = _recipe(tmp_path, *FULL)
    truth = tmp_path / "truth.csv"
    truth.write_text("x\n")
    (r / "score.txt").write_text(f"{truth} sub_exp\n")
    fake, log = _fake_python(tmp_path)
    extra = ["--output", str(tmp_path / "out"), "x=[{a: 1, b: two words}]"]
    p = subprocess.run(["bash", str(ROOT / "run_all.sh"), str(r), *extra], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHON": str(fake)})
    assert p.returncode == 0, p.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    steps = recipe_plan(r)
    assert calls[:-1] == [s.argv(extra) for s in steps]
    assert calls[-1][:3] == ["tools/score_submission.py", "--truth", str(truth)]
    assert str(tmp_path / "out" / "sub_exp" / "submission.csv") in calls[-1]
    shown = [line.split(" (")[0] for line in p.stdout.splitlines() if line.startswith("=== ")]
    assert shown[:len(steps)] == ["=== " + " ".join(s.argv(extra)) for s in steps]
    assert shown[-1].startswith("=== done in")


def test_run_all_stops_on_a_recipe_without_submit(tmp_path: Path) -> None:
    r = _recipe(tmp_path, "base.yaml", "stack.yaml")
    fake, log = _fake_python(tmp_path)
    p = subprocess.run(["bash", str(ROOT / "run_all.sh"), str(r)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": str(fake)})
    assert p.returncode == 2 and "no submit.yaml" in p.stderr
    assert not log.exists()  # no stage ran
