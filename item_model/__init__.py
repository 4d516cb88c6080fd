"""item_model: the ITEm image-title embedding model. Pure PyTorch + transformers: no Ray, and nothing of
`pipeline` or `jobs` (tests/test_layers.py checks the direction of every import).

Names are imported on first use, so `item_model.presets` (plain dicts) loads without transformers.
"""

import importlib

_EXPORTS = {
    "PRESETS": "presets", "VARIANTS": "presets",
    "ItemConfig": "config", "preset_config": "config",
    "build_model": "model_dir", "load_model_dir": "model_dir", "read_model_version": "model_dir",
    "save_model_dir": "model_dir",
    "ItemModel": "modeling",
    "ImageDecodeError": "processor", "ItemProcessor": "processor", "decode_image": "processor",
    "train_tokenizer": "processor", "MODEL_INPUTS": "processor",
    "TwoStreamModel": "two_stream",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
