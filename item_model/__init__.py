"""item_model: the ITEm image-title embedding model (pure PyTorch + transformers; no Ray outside train.py)."""

from .config import PRESETS, VARIANTS, ItemConfig, preset_config
from .model_dir import build_model, load_model_dir, read_model_version, save_model_dir
from .modeling import ItemModel
from .processor import ImageDecodeError, ItemProcessor, decode_image, train_tokenizer
from .two_stream import TwoStreamModel

__all__ = [
    "PRESETS", "VARIANTS", "ItemConfig", "preset_config", "build_model", "ItemModel", "TwoStreamModel",
    "ItemProcessor", "ImageDecodeError", "decode_image", "train_tokenizer",
    "save_model_dir", "load_model_dir", "read_model_version",
]
