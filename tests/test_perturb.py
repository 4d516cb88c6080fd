"""Tests for the seeded re-listing perturbations in pipeline.perturb."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.perturb import (
    IMAGE_PERTURBATIONS,
    TITLE_PERTURBATIONS,
    RelistConfig,
    relist,
    relist_image,
    relist_title,
)

TITLE = "Nordika Black Striped Women's Cotton T-Shirt NO-4821 Size M"


def _photo(fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A 80x80 product-like photo: gradient backdrop and an off-centre block."""
    yy, xx = np.mgrid[0:80, 0:80]
    arr = np.stack([150 + xx, 200 - yy // 2, 120 + (xx + yy) // 4], axis=-1).astype(np.uint8)
    arr[20:60, 25:50] = (200, 30, 40)
    img = Image.fromarray(arr, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


def test_image_is_deterministic_for_a_seed():
    cfg = RelistConfig()
    a = relist_image(_photo(), np.random.default_rng(3), cfg)
    b = relist_image(_photo(), np.random.default_rng(3), cfg)
    c = relist_image(_photo(), np.random.default_rng(4), cfg)
    assert a == b
    assert a != c


def test_image_output_is_a_valid_jpeg_of_the_same_size_and_changed():
    out = relist_image(_photo(), np.random.default_rng(0), RelistConfig())
    img = Image.open(io.BytesIO(out))
    img.load()
    assert img.format == "JPEG" and img.size == (80, 80)
    assert np.abs(_pixels(out) - _pixels(_photo())).mean() > 5


@pytest.mark.parametrize("name", list(IMAGE_PERTURBATIONS))
def test_each_image_perturbation_changes_the_image(name):
    untouched = relist_image(_photo(), np.random.default_rng(0), RelistConfig(), families=[])
    out = relist_image(_photo(), np.random.default_rng(0), RelistConfig(), families=[name])
    assert np.abs(_pixels(out) - _pixels(untouched)).mean() > 0.5


def test_zero_strength_image_is_near_identity():
    out = relist_image(_photo(), np.random.default_rng(0), RelistConfig.identity())
    assert np.abs(_pixels(out) - _pixels(_photo())).mean() < 2.0


def test_png_with_alpha_is_accepted():
    out = relist_image(_photo("PNG", "RGBA"), np.random.default_rng(0), RelistConfig())
    assert Image.open(io.BytesIO(out)).format == "JPEG"


def test_undecodable_image_raises_value_error():
    with pytest.raises(ValueError, match="not a decodable image"):
        relist_image(b"not an image", np.random.default_rng(0), RelistConfig())


def test_title_is_deterministic_for_a_seed_and_changed():
    cfg = RelistConfig()
    a = relist_title(TITLE, np.random.default_rng(5), cfg)
    assert a == relist_title(TITLE, np.random.default_rng(5), cfg)
    assert a != TITLE
    assert len({relist_title(TITLE, np.random.default_rng(s), cfg) for s in range(20)}) > 10


@pytest.mark.parametrize("name", list(TITLE_PERTURBATIONS))
def test_each_title_perturbation_changes_the_title(name):
    assert relist_title(TITLE, np.random.default_rng(0), RelistConfig(), families=[name]) != TITLE


def test_abbreviations_and_seller_tags_appear():
    cfg = RelistConfig()
    outs = [relist_title(TITLE, np.random.default_rng(s), cfg, families=["word_edit"]) for s in range(40)]
    assert any(w in out.lower().split() for out in outs for w in ("blk", "tee", "wmn", "womens", "stripe"))
    tagged = relist_title(TITLE, np.random.default_rng(0), cfg, families=["seller_tag"])
    assert any(tag in tagged for tag in cfg.seller_tags)


def test_zero_strength_title_is_identity_and_empty_title_stays_empty():
    assert relist_title(TITLE, np.random.default_rng(0), RelistConfig.identity()) == TITLE
    assert relist_title("", np.random.default_rng(0), RelistConfig()) == ""


def test_relist_families_select_what_changes():
    photo, cfg = _photo(), RelistConfig()
    untouched = relist_image(photo, np.random.default_rng(0), cfg, families=[])
    title, image = relist(TITLE, photo, np.random.default_rng(1), cfg, families=["title"])
    assert title != TITLE and image == untouched
    title, image = relist(TITLE, photo, np.random.default_rng(1), cfg, families="image")
    assert title == TITLE and image != untouched
    title, image = relist(TITLE, None, np.random.default_rng(1), cfg)
    assert title != TITLE and image is None


def test_unknown_family_and_bad_config_fail_loudly():
    with pytest.raises(ValueError, match="unknown perturbation"):
        relist(TITLE, _photo(), np.random.default_rng(0), RelistConfig(), families=["blur"])
    with pytest.raises(ValueError, match="crop_scale_min"):
        RelistConfig(crop_scale_min=0.0)
