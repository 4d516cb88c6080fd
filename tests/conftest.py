"""Shared fixtures: a tiny model dir (fresh tokenizer, random weights) that any test may load."""

from __future__ import annotations

import pytest

from item_model import ItemModel, ItemProcessor, preset_config, save_model_dir, train_tokenizer
from pipeline.sample_catalog import make_sample_catalog

TINY_CATALOG_ROWS = 120  # enough for every defect kind (>= MIN_ROWS_FOR_ALL_DEFECTS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A complete model dir of the tiny preset, its tokenizer trained on sample-catalog titles."""
    titles = make_sample_catalog(TINY_CATALOG_ROWS, seed=123).column("title").to_pylist()
    tok = train_tokenizer(titles, vocab_size=300)
    model = ItemModel(preset_config("tiny", tok))
    processor = ItemProcessor(tok, image_size=model.config.image_size, max_title_len=model.config.max_title_len)
    directory = str(tmp_path_factory.mktemp("tiny-model"))
    save_model_dir(model, processor, directory)
    return directory
