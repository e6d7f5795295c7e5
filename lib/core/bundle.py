"""A bundle's file list and its checks: what may be in one, and what is refused before anything is read.

A bundle (`lib.stages.bundle` writes one, `lib.stages.predict` reads it) is a folder with `bundle.json`
at its top: the bundle format version, the artifact versions of the code that wrote it, the recipe's
experiments, and every other file with its size and sha256. `open_bundle` refuses, with one line
naming the file: a folder without bundle.json, another bundle format or artifact version, a listed file
that is missing or whose checksum differs, a file the list does not name, a file of a kind that can run
code when loaded (pickle, joblib, torch .pt/.pth, .npy) or whose bytes start like a pickle. Loading a
bundle therefore never unpickles anything: tensors are safetensors, trees their library's own format,
the rest JSON / YAML / Markdown / PNG. No ML library is imported here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lib.core.artifacts import BUNDLE_JSON, file_digest
from lib.core.errors import PipelineError
from lib.core.io import read_json

BUNDLE_FORMAT_VERSION = 1
SAFE_SUFFIXES = (".json", ".yaml", ".md", ".png", ".safetensors", ".ubj", ".txt", ".csv")
CODE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".npy", ".npz", ".bin", ".ckpt")


class BundleError(PipelineError):
    """A bundle that cannot be used as it is (one line: the file and the problem)."""


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON object."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            return False
        n = int.from_bytes(head, "little")
        if n <= 1 or n > path.stat().st_size - 8:
            return False
        text = f.read(n)
    try:
        return isinstance(json.loads(text.decode("utf-8")), dict)
    except ValueError:
        return False


def looks_like_pickle(path: str | Path) -> bool:
    """Bytes that are not what the suffix says, the way a renamed pickle is not: a `.safetensors` file
    must have the safetensors layout; any other file must not start like a pickle stream of protocol
    2-5 (0x80 + the protocol byte). torch.save's zip files are refused by suffix."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return not _is_safetensors(path)
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def refuse_unsafe(path: Path) -> None:
    """BundleError when `path` is of a kind that can run code when loaded."""
    suffix = path.suffix.lower()
    if suffix in CODE_SUFFIXES or looks_like_pickle(path):
        raise BundleError(f"{path}: refused: a {suffix or 'pickle-like'} file can run code when loaded "
                          "(a bundle holds safetensors, XGBoost/LightGBM model files, JSON, YAML, Markdown, PNG)")
    if suffix not in SAFE_SUFFIXES:
        raise BundleError(f"{path}: refused: '{suffix}' is not a bundle file kind ({', '.join(SAFE_SUFFIXES)})")


def bundle_files(root: Path) -> list[str]:
    """Every file under `root` but bundle.json, as sorted POSIX paths relative to it."""
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = (Path(dirpath) / n).relative_to(root).as_posix()
            if rel != BUNDLE_JSON:
                out.append(rel)
    return sorted(out)


def file_records(root: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `root` (bundle.json excluded), each one
    checked to be of a safe kind."""
    recs = {}
    for rel in bundle_files(root):
        p = root / rel
        refuse_unsafe(p)
        recs[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    return recs


def _check_versions(path: Path, doc: dict, expected: dict[str, int]) -> None:
    if doc.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {doc.get('format_version')!r}; this code reads version "
                          f"{BUNDLE_FORMAT_VERSION}: export the bundle again with this code (tools/export_bundle.py)")
    made = doc.get("artifact_versions") or {}
    for name, want in expected.items():
        if made.get(name) != want:
            raise BundleError(f"{path}: made by code whose {name} is {made.get(name)!r}; this code reads {want}: "
                              "export the bundle again with this code, or predict with the code that made it")


def open_bundle(root: str | Path, expected_versions: dict[str, int]) -> dict:
    """bundle.json of a verified bundle (see the module docstring for what is refused)."""
    root = Path(root)
    path = root / BUNDLE_JSON
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} not found")
    if not path.is_file():
        raise BundleError(f"{path} not found: {root} is not a bundle (tools/export_bundle.py writes one)")
    doc = read_json(path)
    _check_versions(path, doc, expected_versions)
    listed = doc.get("files") or {}
    present = set(bundle_files(root))
    for rel in sorted(present - set(listed)):
        refuse_unsafe(root / rel)
        raise BundleError(f"{root / rel}: not listed in {path}: a bundle holds only the files it lists")
    for rel, rec in sorted(listed.items()):
        p = root / rel
        if rel not in present:
            raise BundleError(f"{p}: missing from the bundle ({path} lists it): copy the whole bundle folder again")
        refuse_unsafe(p)
        if p.stat().st_size != rec["bytes"] or sha256_file(p) != rec["sha256"]:
            raise BundleError(f"{p}: checksum does not match {path} (damaged or edited): copy the bundle again")
    return doc
