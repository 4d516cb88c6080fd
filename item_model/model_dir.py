"""The model dir: save and load an ITEm model with its processor, checked for consistency.

A model dir holds config.json, model.safetensors (never pickled weights), the tokenizer files,
processor_config.json and `model_version`, a stable id derived from the weights themselves.
"""

from __future__ import annotations

import hashlib
import os

import torch
from transformers.utils import logging as hf_logging

from .config import ItemConfig
from .modeling import ItemModel
from .processor import ItemProcessor
from .two_stream import TwoStreamModel

MODEL_CLASSES = {"single_stream": ItemModel, "two_stream": TwoStreamModel}

VERSION_FILE = "model_version"

# transformers draws a progress bar for every load and save of a few-MB model dir: noise in batch logs
# (one per encode actor) and in the CLI's output
hf_logging.disable_progress_bar()


def weights_version(directory: str) -> str:
    """`item-` + the first 16 hex digits of model.safetensors' SHA-256: same weights, same version."""
    digest = hashlib.sha256()
    with open(os.path.join(directory, "model.safetensors"), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"item-{digest.hexdigest()[:16]}"


def build_model(config: ItemConfig) -> ItemModel | TwoStreamModel:
    """A freshly initialised model of the architecture that `config` names."""
    return MODEL_CLASSES[config.architecture](config)


def save_model_dir(model: ItemModel | TwoStreamModel, processor: ItemProcessor, directory: str) -> str:
    """Write a complete model dir and return its model_version."""
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    version = weights_version(directory)
    model.config.model_version = version
    model.config.save_pretrained(directory)
    with open(os.path.join(directory, VERSION_FILE), "w") as f:
        f.write(version + "\n")
    return version


def read_model_version(directory: str) -> str:
    path = os.path.join(directory, VERSION_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no {VERSION_FILE}: save it with item_model.save_model_dir")
    with open(path) as f:
        return f.read().strip()


def check_compatible(config: ItemConfig, processor: ItemProcessor) -> None:
    """Values that must match between model and tokenizer/processor are checked, never assumed."""
    tok = processor.tokenizer
    pairs = {
        "vocab_size": (config.vocab_size, len(tok)),
        "pad_token_id": (config.pad_token_id, tok.pad_token_id),
        "cls_token_id": (config.cls_token_id, tok.cls_token_id),
        "sep_token_id": (config.sep_token_id, tok.sep_token_id),
        "mask_token_id": (config.mask_token_id, tok.mask_token_id),
        "image_size": (config.image_size, processor.image_size),
        "max_title_len": (config.max_title_len, processor.max_title_len),
    }
    bad = {k: v for k, v in pairs.items() if v[0] != v[1]}
    if bad:
        detail = ", ".join(f"{k}: model {m} vs processor {p}" for k, (m, p) in bad.items())
        raise ValueError(f"model and processor disagree ({detail}); they must be saved together by save_model_dir")


def load_model_dir(
    directory: str, device: str | torch.device = "cpu"
) -> tuple[ItemModel | TwoStreamModel, ItemProcessor]:
    """Load (model in eval mode on `device`, processor) from a model dir made by save_model_dir."""
    if not os.path.exists(os.path.join(directory, "model.safetensors")):
        raise FileNotFoundError(
            f"{directory} has no model.safetensors: not a model dir (make one with `item-pipeline pretrain`)"
        )
    processor = ItemProcessor.from_pretrained(directory)
    config = ItemConfig.from_pretrained(directory)
    model = MODEL_CLASSES[config.architecture].from_pretrained(directory, config=config, use_safetensors=True)
    check_compatible(model.config, processor)
    return model.to(device).eval(), processor
