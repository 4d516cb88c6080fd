"""item_model: the ITEm image-title embedding model (pure PyTorch + transformers; no Ray outside train.py)."""

from .config import PRESETS, ItemConfig, preset_config
from .model_dir import load_model_dir, read_model_version, save_model_dir
from .modeling import ItemModel
from .processor import ImageDecodeError, ItemProcessor, decode_image, train_tokenizer

__all__ = [
    "PRESETS", "ItemConfig", "preset_config", "ItemModel", "ItemProcessor", "ImageDecodeError",
    "decode_image", "train_tokenizer", "save_model_dir", "load_model_dir", "read_model_version",
]
