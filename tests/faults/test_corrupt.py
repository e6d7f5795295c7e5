"""Corrupt caches and edited files: a truncated parquet / cached JPEG / trunk .npy / safetensors
weights file, a manifest.json edited by hand, a folds.csv changed under finished stages. Each is
either recomputed (the stage's rerun succeeds and its outputs equal the reference run's, tolerance 0)
or refused with one line naming the file (exit 2, no stack trace); never silently used."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from tests.faults.battery import (
    TINY_ENC,
    corrupt_files,
    differences,
    must_pass,
    of_stage,
    one_line_error,
    record,
    run_stage,
    snapshot,
    temp_files,
)

pytestmark = pytest.mark.e2e
PREP = "prep/milk10k_sample"
ALL = ["01", "02", "03", "04", "05"]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def first_image(out: Path) -> Path:
    return sorted((out / PREP / "images").rglob("*.jpg"))[0]


def only(out: Path, pattern: str) -> Path:
    hits = sorted(out.glob(pattern))
    assert len(hits) == 1, (pattern, hits)
    return hits[0]


# (name, stages copied from the reference, stage run, file to corrupt (relative glob), how, extra args,
#  expected: "recomputed" or "refused")
CASES = [
    ("cached JPEG cut short, 01 rerun", ALL[:1], "01", f"{PREP}/images/*/IL_0047878__dermoscopic.jpg", "truncate",
     (), "recomputed"),
    ("fold OOF parquet cut short, 02 rerun", ALL[:2], "02", "sample_fusion/fold1/oof.parquet", "truncate", (),
     "recomputed"),
    ("fold test logits emptied, 02 rerun", ALL[:2], "02", "sample_fusion/fold2/test_logits.parquet", "empty", (),
     "recomputed"),
    ("embedding cache parquet cut short, 03 rerun", ALL[:3], "03", f"{PREP}/features/lite0-*/train-*.parquet",
     "truncate", (), "recomputed"),
    ("embedding cache .json cut short, 03 rerun", ALL[:3], "03", f"{PREP}/features/lite0-*/test-*.json",
     "truncate", (), "recomputed"),
    ("prepared train.parquet cut short, 02", ALL[:1], "02", f"{PREP}/train.parquet", "truncate", (), "refused"),
    ("folds.csv emptied, 03", ALL[:1], "03", f"{PREP}/folds.csv", "empty", (), "refused"),
    ("member OOF parquet cut short, 04", ALL[:3], "04", "sample_fusion/oof.parquet", "truncate", (), "refused"),
    ("features parquet cut short, 04", ALL[:3], "04", "sample_stack/features/lite0_train.parquet", "copy-truncate",
     (), "refused"),
    ("member test parquet cut short, 05", ALL[:4], "05", "sample_stack/test.parquet", "truncate", (), "refused"),
    ("member manifest.json cut short, 04", ALL[:3], "04", "sample_fusion/manifest.json", "truncate", (), "refused"),
    ("member manifest.json folds_sha1 edited, 05", ALL[:4], "05", "sample_stack/manifest.json", "edit-folds", (),
     "refused"),
    ("member manifest.json emptied to {}, 05", ALL[:4], "05", "sample_fusion/manifest.json", "edit-empty", (),
     "refused"),
    ("features manifest.json deleted, 04", ALL[:3], "04", "sample_stack/features/manifest.json", "delete", (),
     "refused"),
]


def corrupt(path: Path, how: str) -> None:
    if how == "truncate":
        truncate(path)
    elif how == "copy-truncate":  # a hard link into the cache: cut this name only
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "delete":
        path.unlink()
    elif how == "edit-folds":
        m = json.loads(path.read_text())
        m["folds_sha1"] = "0" * 40
        path.write_text(json.dumps(m))
    elif how == "edit-empty":
        path.write_text("{}")
    else:
        raise ValueError(how)


@pytest.mark.parametrize("name, copied, stage, target, how, extra, expected", CASES, ids=[c[0] for c in CASES])
def test_corrupt_file_is_recomputed_or_refused(name, copied, stage, target, how, extra, expected, reference,
                                                tmp_path):
    out = reference.workspace(copied)
    path = only(out, target)
    rel = str(path.relative_to(out))
    corrupt(path, how)
    before = snapshot(out)
    r = run_stage(stage, out, *extra)
    if expected == "recomputed":
        ok = r.rc == 0
        diff = differences(of_stage(reference.snap, sorted(set(copied) | {stage})), snapshot(out))
        record(stage, f"corrupt: {name}", ok and not diff, len(diff), "; ".join(diff[:3]))
        must_pass(r, name)
        assert not diff, diff
        assert not temp_files(out), f"the rerun left temp files: {temp_files(out)}"
    else:
        ok = r.rc == 2 and "Traceback" not in r.stderr and rel.split("/")[-1] in r.stderr
        record(stage, f"corrupt: {name}", ok, 0, r.stderr.strip().splitlines()[-1][:120] if r.stderr.strip() else "")
        line = one_line_error(r)
        assert Path(rel).name in line or (how == "edit-folds" and "folds.csv" in line) or (
            how in ("edit-empty", "delete") and "manifest.json" in line), line
        assert set(corrupt_files(out)) <= {rel}
        assert not differences(before, snapshot(out)), "a refused run changed or wrote files"


def test_folds_changed_under_finished_stages(reference, tmp_path):
    """folds.csv edited by hand (two lesions swap folds) under finished 02-05: 02 retrains exactly the
    two folds whose rows changed and records the new folds; 04 (features made on the old folds) and
    05 (members made on the old folds) refuse in one line naming folds.csv."""
    out = reference.workspace(ALL)
    folds_path = out / PREP / "folds.csv"
    fo = pd.read_csv(folds_path, dtype={"lesion_id": str})
    a = fo.index[fo["fold"] == 0][0]
    b = fo.index[fo["fold"] == 1][0]
    fo.loc[[a, b], "fold"] = [1, 0]
    fo.to_csv(folds_path, index=False)
    stamps = {k: (out / f"sample_fusion/fold{k}/oof.parquet").stat().st_mtime_ns for k in range(3)}
    r4 = run_stage("04", out, TINY_ENC)
    r5 = run_stage("05", out)
    r2 = run_stage("02", out)
    retrained = sorted(k for k in range(3) if (out / f"sample_fusion/fold{k}/oof.parquet").stat().st_mtime_ns
                       != stamps[k])
    man = json.loads((out / "sample_fusion/manifest.json").read_text())
    sha = hashlib.sha1(folds_path.read_bytes()).hexdigest()
    ok = (r4.rc == 2 and "folds.csv" in r4.stderr and r5.rc == 2 and "folds.csv" in r5.stderr and r2.rc == 0
          and retrained == [0, 1] and man["folds_sha1"] == sha)
    for st in ("02", "04", "05"):
        record(st, "folds.csv changed under a finished stage", ok, 0, f"retrained {retrained}")
    one_line_error(r4, "folds.csv")
    one_line_error(r5, "folds.csv")
    must_pass(r2, "02 after folds.csv changed")
    assert retrained == [0, 1]
    assert man["folds_sha1"] == sha
    for k in range(3):
        oof = pd.read_parquet(out / f"sample_fusion/fold{k}/oof.parquet")
        assert set(oof["lesion_id"]) == set(fo.loc[fo["fold"] == k, "lesion_id"])


def test_truncated_trunk_cache_is_recomputed(reference, tmp_path):
    """An encoder with a cut caches its trunk activations (prep/<data>/trunks/<enc>-<key>/*.npy): one cut
    short is recomputed and the embeddings equal those of the first run."""
    out = reference.workspace(["01"])
    enc = "features.encoders=[{name: lite0, arch: test_efficientnet, weights: null, size: 64, cut: conv_head}]"
    must_pass(run_stage("03", out, enc), "03 with a cut")
    first = snapshot(out)
    npy = sorted((out / PREP / "trunks").rglob("train_dermoscopic.npy"))
    assert len(npy) == 1
    truncate(npy[0], 0.3)
    emb = only(out, f"{PREP}/features/lite0-*/train-*.parquet")
    emb.unlink()  # the embeddings are recomputed from the trunk cache, which must be read again
    r = run_stage("03", out, enc)
    diff = differences(first, snapshot(out))
    record("03", "corrupt: trunk .npy cut short, 03 rerun", r.rc == 0 and not diff, len(diff), "; ".join(diff[:3]))
    must_pass(r, "03 rerun after the trunk cache was cut")
    assert not diff, diff


def test_truncated_safetensors_weights_are_refused(reference, tmp_path):
    """A weights file cut short (safetensors) is refused in one line naming it, before any output."""
    from safetensors.torch import save_file

    from lib.vision import backbones
    out = reference.workspace(["01"])
    w = tmp_path / "enc.safetensors"
    model = backbones.build_backbone("test_efficientnet", None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(w))
    truncate(w)
    enc = f"features.encoders=[{{name: lite0, arch: test_efficientnet, weights: {w}, size: 64}}]"
    r = run_stage("03", out, enc)
    record("03", "corrupt: safetensors weights cut short", r.rc == 2 and w.name in r.stderr
           and "Traceback" not in r.stderr, 0, r.stderr.strip()[-120:])
    one_line_error(r, w.name)
    assert not (out / "sample_stack/features/manifest.json").exists()
