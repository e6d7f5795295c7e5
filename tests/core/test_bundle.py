"""lib/core/bundle.py: what a bundle may hold and what opening one refuses (one line naming the file)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from lib.core import bundle as B

VERSIONS = {"model": 1, "stacker": 1}


def _bundle(root: Path) -> Path:
    (root / "exp" / "fold0").mkdir(parents=True)
    (root / "exp" / "config.yaml").write_text("exp: exp\n")
    (root / "exp" / "fold0" / "model.json").write_text(json.dumps({"fold": 0}))
    (root / "exp" / "fold0" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    doc = {"format_version": B.BUNDLE_FORMAT_VERSION, "artifact_versions": VERSIONS, "files": B.file_records(root)}
    (root / B.BUNDLE_JSON).write_text(json.dumps(doc))
    return root


def test_a_complete_bundle_opens(tmp_path: Path) -> None:
    doc = B.open_bundle(_bundle(tmp_path), VERSIONS)
    assert set(doc["files"]) == {"exp/config.yaml", "exp/fold0/model.json", "exp/fold0/model.safetensors"}


def test_a_planted_pickle_is_refused(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (root / "exp" / "evil.pkl").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(B.BundleError, match=r"evil\.pkl: refused: a \.pkl file can run code"):
        B.open_bundle(root, VERSIONS)


def test_a_pickle_renamed_to_a_safe_suffix_is_refused_even_when_listed(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "weights.safetensors").write_bytes(pickle.dumps([1, 2, 3], protocol=4))
    with pytest.raises(B.BundleError, match="weights.safetensors: refused"):
        B.file_records(root)   # the exporter never writes one ...
    doc = {"format_version": B.BUNDLE_FORMAT_VERSION, "artifact_versions": VERSIONS,
           "files": {"weights.safetensors": {"bytes": 1, "sha256": "x"}}}
    (root / B.BUNDLE_JSON).write_text(json.dumps(doc))
    with pytest.raises(B.BundleError, match="weights.safetensors: refused"):
        B.open_bundle(root, VERSIONS)   # ... and the reader refuses one planted and listed by hand


def test_torch_files_are_refused_by_kind(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (root / "exp" / "fold0" / "model.pt").write_bytes(b"PK\x03\x04zip")
    with pytest.raises(B.BundleError, match=r"model\.pt: refused"):
        B.open_bundle(root, VERSIONS)


def test_a_missing_part_is_named(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (root / "exp" / "fold0" / "model.safetensors").unlink()
    with pytest.raises(B.BundleError, match=r"fold0/model\.safetensors: missing from the bundle"):
        B.open_bundle(root, VERSIONS)


def test_a_changed_file_fails_its_checksum(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (root / "exp" / "config.yaml").write_text("exp: other\n")
    with pytest.raises(B.BundleError, match=r"config\.yaml: checksum does not match"):
        B.open_bundle(root, VERSIONS)


def test_an_unlisted_file_is_refused(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (root / "exp" / "notes.json").write_text("{}")
    with pytest.raises(B.BundleError, match=r"notes\.json: not listed"):
        B.open_bundle(root, VERSIONS)


@pytest.mark.parametrize("field,value,match", [
    ("format_version", 99, "bundle format version 99"),
    ("artifact_versions", {"model": 1, "stacker": 2}, "stacker is 2; this code reads 1"),
])
def test_other_versions_are_refused(tmp_path: Path, field: str, value, match: str) -> None:
    root = _bundle(tmp_path)
    doc = json.loads((root / B.BUNDLE_JSON).read_text())
    doc[field] = value
    (root / B.BUNDLE_JSON).write_text(json.dumps(doc))
    with pytest.raises(B.BundleError, match=match):
        B.open_bundle(root, VERSIONS)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(B.BundleError, match="bundle.json not found"):
        B.open_bundle(tmp_path, VERSIONS)
    with pytest.raises(B.BundleError, match="not found"):
        B.open_bundle(tmp_path / "nope", VERSIONS)
