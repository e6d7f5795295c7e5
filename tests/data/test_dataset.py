"""lib.data.dataset: the fingerprint of a table's rows (ids + image contents + chosen values), the key of
every test-side cache: it changes when an image's bytes, an id, the row order or a value changes, and
only then."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib.core.errors import PipelineError
from lib.data import dataset
from lib.stages import prepare
from tests.helpers import milk_cfg, write_jpeg


def _table(folder: Path, n: int = 4) -> pd.DataFrame:
    for i in range(n):
        write_jpeg(folder / f"L{i}__derm.jpg", seed=i)
        write_jpeg(folder / f"L{i}__clin.jpg", seed=10 + i)
    return pd.DataFrame({"lesion_id": [f"L{i}" for i in range(n)],
                         "path_derm": [f"L{i}__derm.jpg" for i in range(n)],
                         "path_clin": [f"L{i}__clin.jpg" for i in range(n)],
                         "meta_age": np.arange(n, dtype=float) * 10})


def _fp(folder: Path, df: pd.DataFrame, values: bool = False) -> str:
    dig = {m: dataset.image_digests(folder, df[f"path_{m}"]) for m in ("derm", "clin")}
    return dataset.rows_fingerprint(df["lesion_id"], dig, df[["meta_age"]] if values else None)


def test_fingerprint_follows_ids_order_image_bytes_and_values(tmp_path: Path) -> None:
    df = _table(tmp_path)
    base = _fp(tmp_path, df)
    assert _fp(tmp_path, df) == base and len(base) == 40
    assert _fp(tmp_path, df.iloc[::-1].reset_index(drop=True)) != base                 # order
    assert _fp(tmp_path, df.assign(lesion_id=["L0", "L1", "L2", "LX"])) != base        # an id
    assert _fp(tmp_path, df.iloc[:3]) != base                                          # a row dropped
    assert _fp(tmp_path, df, values=True) != base                                      # values included
    with_values = _fp(tmp_path, df, values=True)
    assert _fp(tmp_path, df.assign(meta_age=[0.0, 10.0, 20.0, 31.0]), values=True) != with_values
    assert _fp(tmp_path, df.assign(meta_age=[0.0, 10.0, 20.0, 31.0])) == base          # images only: not read
    shutil.copyfile(tmp_path / "L1__clin.jpg", tmp_path / "L3__clin.jpg")              # same id, another image
    assert _fp(tmp_path, df) != base
    write_jpeg(tmp_path / "L3__clin.jpg", seed=13)                                     # the same bytes again
    assert _fp(tmp_path, df) == base


def test_fingerprint_checks_its_inputs(tmp_path: Path) -> None:
    df = _table(tmp_path, 2)
    with pytest.raises(ValueError, match="2 ids but other counts of digests for \\['derm'\\]"):
        dataset.rows_fingerprint(df["lesion_id"], {"derm": ["a"]})
    with pytest.raises(PipelineError, match="image not found: .*nowhere.jpg"):
        dataset.image_digests(tmp_path, ["nowhere.jpg"])


def test_table_fingerprint_of_a_prepared_sample(tmp_path: Path) -> None:
    """On stage 01's tables: the cached images of every modality, and `model_inputs` (meta_*, monet_*)."""
    from tests.helpers import SAMPLE

    cfg = milk_cfg(SAMPLE, tmp_path)
    prepare.run(cfg)
    info, train, test = dataset.load_dataset(cfg)
    cols = dataset.model_inputs(test)
    assert cols and all(c.startswith(("meta_", "monet_")) for c in cols)
    plain, full = dataset.table_fingerprint(cfg, info, test), dataset.table_fingerprint(cfg, info, test, cols)
    assert plain != full and dataset.table_fingerprint(cfg, info, test.iloc[1:]) != plain
    folder = Path(cfg["paths"]["prep"])
    img = folder / test[f"path_{info['modalities'][0]}"].iloc[0]
    img.write_bytes(img.read_bytes() + b"\0")   # one cached image's bytes change
    assert dataset.table_fingerprint(cfg, info, test) != plain
