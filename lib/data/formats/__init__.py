"""Data formats: one module per release layout, a registry (`registry.get_format`) and the shared
reader helpers. A reader returns a `Raw` record: one row per lesion (or case) with `lesion_id`,
`src_<modality>` source image references, `y_<CLASS>` labels (train only), raw metadata columns and
MONET scores; `encode_metadata` helpers turn raw metadata into `meta_*` features fitted on train.
"""
from lib.data.formats.common import (
                                     IMAGE_EXTS,
                                     Raw,
                                     check_unique,
                                     find_dir,
                                     index_images,
                                     labels_from_names,
                                     onehot_labels,
                                     read_csv,
                                     resolve_images,
                                     to_numeric,
)
from lib.data.formats.encoding import (
                                     apply_meta_encoders,
                                     fit_meta_encoders,
                                     label_columns,
                                     meta_columns,
                                     monet_columns,
)
from lib.data.formats.generic import read_generic
from lib.data.formats.ham10000 import HAM_CLASSES, read_ham10000
from lib.data.formats.isic2019 import ISIC2019_CLASSES, read_isic2019
from lib.data.formats.isic2024 import ISIC2024_NUM, read_isic2024
from lib.data.formats.milk10k import MILK_CLASSES, MILK_MODALITIES, read_milk10k
from lib.data.formats.registry import FormatSpec, format_names, get_format, read_split

__all__ = ["IMAGE_EXTS", "Raw", "check_unique", "find_dir", "index_images", "labels_from_names", "onehot_labels",
           "read_csv", "resolve_images", "to_numeric", "apply_meta_encoders", "fit_meta_encoders",
           "label_columns", "meta_columns", "monet_columns", "read_generic", "HAM_CLASSES", "read_ham10000",
           "ISIC2019_CLASSES", "read_isic2019", "ISIC2024_NUM", "read_isic2024", "MILK_CLASSES",
           "MILK_MODALITIES", "read_milk10k", "FormatSpec", "format_names", "get_format", "read_split"]
