"""The recipe plan: which numbered script runs with which file of a recipe folder, in which order.

A recipe folder (`configs/<recipe>/`) holds `base.yaml` (01), `train_*.yaml` (02, one image-model
experiment each), `stack*.yaml` (03 then 04, per file) and `submit.yaml` (05). Only the folder's own
files count: sub-folders (e.g. `ablations/`) and other names (`variant_*.yaml`, `score.txt`) are not
run. Files of one kind run in name order (code-point order: `stack.yaml` before `stack_ft.yaml`).

    python -m lib.stages.plan configs/milk10k_sample [extra args]   # one stage command per line

prints each command shell-quoted (`01_preprocess.py -c configs/milk10k_sample/base.yaml ...`, run it
with python), the extra arguments appended to every one. `run_all.sh`, the Kaggle notebook
(`kaggle/build_notebook.py`) and the e2e tests read this plan. No ML import here: it loads in
milliseconds. A missing recipe folder, base.yaml or submit.yaml is a ConfigError (one line, exit 2).
"""
from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lib.core.errors import ConfigError, PipelineError

BASE, SUBMIT = "base.yaml", "submit.yaml"
TRAIN_GLOB, STACK_GLOB = "train_*.yaml", "stack*.yaml"
SCRIPTS = {"prepare": "01_preprocess.py", "train": "02_train_fold.py", "features": "03_extract_features.py",
           "stack": "04_stack.py", "submit": "05_submit.py"}
LABELS = {"prepare": "01_preprocess", "train": "02_train", "features": "03_features", "stack": "04_stack",
          "submit": "05_submit"}


@dataclass(frozen=True)
class Step:
    """One stage command: `kind` (prepare | train | features | stack | submit) run on `config`."""

    kind: str
    config: Path

    @property
    def script(self) -> str:
        return SCRIPTS[self.kind]

    @property
    def name(self) -> str:
        """A short label: `01_preprocess`, `02_train train_fusion`, `03_features stack`, `05_submit`."""
        per_file = self.kind in ("train", "features", "stack")
        return f"{LABELS[self.kind]} {self.config.stem}" if per_file else LABELS[self.kind]

    def argv(self, extra: Sequence[str] = ()) -> list[str]:
        """The command's arguments after the interpreter: script, -c config, then `extra`."""
        return [self.script, "-c", str(self.config), *map(str, extra)]


def _files(recipe: Path, pattern: str) -> list[Path]:
    """The recipe folder's own files matching `pattern`, in name order (no sub-folder is searched)."""
    return sorted((p for p in recipe.glob(pattern) if p.is_file()), key=lambda p: p.name)


def recipe_plan(recipe: str | Path) -> list[Step]:
    """The ordered stage commands of a recipe folder: 01 base, 02 per train_*, 03 + 04 per stack*, 05 submit."""
    recipe = Path(recipe)
    if not recipe.is_dir():
        raise ConfigError(f"recipe folder {recipe} not found (a folder under configs/, e.g. configs/milk10k_sample)")
    for name in (BASE, SUBMIT):
        if not (recipe / name).is_file():
            raise ConfigError(f"recipe folder {recipe} has no {name} (a recipe holds {BASE}, {TRAIN_GLOB}, "
                              f"{STACK_GLOB} and {SUBMIT})")
    steps = [Step("prepare", recipe / BASE)]
    steps += [Step("train", f) for f in _files(recipe, TRAIN_GLOB)]
    for f in _files(recipe, STACK_GLOB):
        steps += [Step("features", f), Step("stack", f)]
    return [*steps, Step("submit", recipe / SUBMIT)]


def plan_configs(steps: Sequence[Step]) -> list[Path]:
    """The recipe files the plan runs, each once, in plan order."""
    return list(dict.fromkeys(s.config for s in steps))


def plan_lines(recipe: str | Path, extra: Sequence[str] = ()) -> list[str]:
    """One shell-quoted command per step (what `python -m lib.stages.plan` prints)."""
    broken = [a for a in extra if "\n" in a or "\r" in a]
    if broken:
        raise ConfigError(f"argument {broken[0]!r} holds a line break: the plan prints one command per line")
    return [shlex.join(s.argv(extra)) for s in recipe_plan(recipe)]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\nusage: python -m lib.stages.plan RECIPE_FOLDER [extra args]",
              file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    try:
        lines = plan_lines(args[0], args[1:])
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
