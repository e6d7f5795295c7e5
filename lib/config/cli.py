"""The command line shared by every numbered script: flags -> overrides -> config; errors -> exit 2."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

from lib.config.load import load_config
from lib.core.errors import PipelineError
from lib.core.runtime import check_writable

log = logging.getLogger(__name__)

# a write the disk refused: full, over quota, read-only, no permission (a user's problem, one line, exit 2)
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def build_parser(description: str) -> argparse.ArgumentParser:
    """The CLI shared by every numbered script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("-c", "--config", help="experiment YAML under configs/")
    p.add_argument("--data", help="data root (sets data.root), e.g. ../shared/data/milk10k")
    p.add_argument("--test-data", help="test release folder (sets data.test_root)")
    p.add_argument("--output", help="output root (sets paths.output)")
    p.add_argument("--exp", help="experiment name (sets exp)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.epochs=2")
    return p


def cli_config(argv: list[str] | None, description: str,
               extra: list[tuple[tuple, dict]] | None = None) -> tuple[dict, argparse.Namespace]:
    """Parse argv into (resolved config, namespace). Extra arguments: [((flags), kwargs)]."""
    p = build_parser(description)
    for flags, kw in extra or []:
        p.add_argument(*flags, **kw)
    ns = p.parse_intermixed_args(argv)  # overrides may come before or after flags
    setup_logging(ns.verbose)
    ov = list(ns.overrides)
    for flag, key in (("data", "data.root"), ("test_data", "data.test_root"),
                      ("output", "paths.output"), ("exp", "exp")):
        val = getattr(ns, flag)
        if val is not None:
            ov.append(f"{key}={json.dumps(val)}")  # a quoted YAML string: `--exp 2024` stays a name
    return load_config(ns.config, ov), ns


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def stage_name(main_fn) -> str:
    """The script a stage's `main` lives in (`02_train_fold.py`), else the command that runs."""
    code = getattr(main_fn, "__code__", None)
    return Path(code.co_filename if code else sys.argv[0]).name


def apply_paths(cfg: dict) -> None:
    """Before any work: the output folder must be writable (one-line error if not), and
    `paths.weights_cache` (when set) is where converted weights are looked up and cached."""
    check_writable(cfg["paths"]["output"])
    if cfg["paths"]["weights_cache"]:
        os.environ["SKL_CACHE_DIR"] = str(cfg["paths"]["weights_cache"])


def disk_error(e: OSError) -> str:
    """One line for a write the disk refused (full, read-only, no permission): the file and what to do;
    writes are atomic, so nothing half written was left in place of a final file."""
    where = e.filename or "the output folder"
    fix = ("free space (or pass another --output)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else
           "make it writable (or pass a writable --output)")
    return (f"{where}: {e.strerror or errno.errorcode.get(e.errno, 'OSError')}: {fix}, then rerun the same "
            "command (finished work is reused; nothing half written was kept)")


def _guarded(work, what: str) -> int:
    """Run `work()`: user errors become one clear line and exit code 2; Ctrl-C exits 130; a finished
    stage logs one summary line (`what()`) with its wall time."""
    t0 = time.perf_counter()
    try:
        name = work()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        print(f"error: {disk_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue (finished work is reused; 02 takes --resume "
              "to continue a half-finished fold)", file=sys.stderr)
        return 130
    log.info("%s (exp %s): done in %.1f s", what, name, time.perf_counter() - t0)
    return 0


def run_script(main_fn, argv: list[str] | None, description: str,
               extra: list[tuple[tuple, dict]] | None = None) -> int:
    """Entry point wrapper of the numbered scripts 01-05 (see `_guarded`)."""
    def work() -> str:
        cfg, ns = cli_config(argv, description, extra)
        apply_paths(cfg)
        main_fn(cfg, **{k: v for k, v in vars(ns).items()
                        if k not in ("config", "data", "test_data", "output", "exp", "verbose", "overrides")})
        return str(cfg["exp"])
    return _guarded(work, stage_name(main_fn))


def predict_parser(description: str) -> argparse.ArgumentParser:
    """The CLI of 06_predict.py: a bundle, a test release, where to write, runtime overrides."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder (tools/export_bundle.py)")
    p.add_argument("--test-data", required=True, help="test release folder, in the bundle's data format")
    p.add_argument("--output", default="output", help="output root (default: output)")
    p.add_argument("--exp", default="predict", help="name of the run's folder under --output (default: predict)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", help="runtime overrides only: device=cuda threads=4 features.runtime=torch")
    return p


def run_predict(main_fn, argv: list[str] | None, description: str) -> int:
    """Entry point wrapper of 06_predict.py: `main_fn` gets {bundle, test_data, output, exp, overrides}."""
    def work() -> str:
        ns = predict_parser(description).parse_intermixed_args(argv)
        setup_logging(ns.verbose)
        main_fn({"bundle": ns.bundle, "test_data": ns.test_data, "output": ns.output, "exp": ns.exp,
                 "overrides": list(ns.overrides)})
        return str(ns.exp)
    return _guarded(work, stage_name(main_fn))
