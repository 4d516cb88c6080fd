"""ItemProcessor tests: every image mode becomes RGB, every unusable image raises one error type."""

from __future__ import annotations

import io
import time
import zlib
import struct

import numpy as np
import pytest
from PIL import Image

from item_model import ImageDecodeError, ItemProcessor, decode_image, train_tokenizer

SIZE = 32


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 40, h: int = 30) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.uint8)
    return np.broadcast_to(x[None, :, None], (h, w, 3)).copy()


@pytest.mark.parametrize(
    "name,data",
    [
        ("rgb_jpeg", lambda: encode(Image.fromarray(gradient()), "JPEG")),
        ("rgba_png", lambda: encode(Image.fromarray(gradient()).convert("RGBA"), "PNG")),
        ("palette_png", lambda: encode(Image.fromarray(gradient()).convert("P"), "PNG")),
        ("palette_transparent_png", lambda: encode(Image.fromarray(gradient()).convert("P"), "PNG", transparency=0)),
        ("cmyk_jpeg", lambda: encode(Image.fromarray(gradient()).convert("CMYK"), "JPEG")),
        ("grayscale_png", lambda: encode(Image.fromarray(gradient()).convert("L"), "PNG")),
        ("grayscale_alpha_png", lambda: encode(Image.fromarray(gradient()).convert("LA"), "PNG")),
        ("gray16_png", lambda: encode(Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)), "PNG")),
        ("webp", lambda: encode(Image.fromarray(gradient()), "WEBP")),
        ("tiny_1x1", lambda: encode(Image.new("RGB", (1, 1), "red"), "PNG")),
        ("tall_3x900", lambda: encode(Image.new("RGB", (3, 900), "blue"), "JPEG")),
        ("large_3000x2000", lambda: encode(Image.new("RGB", (3000, 2000), "green"), "JPEG")),
    ],
)
def test_modes_and_sizes_become_rgb(name, data):
    out = decode_image(data(), SIZE)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


def test_content_survives_letterboxing():
    red = decode_image(encode(Image.new("RGB", (40, 20), (255, 0, 0)), "PNG"), SIZE)
    assert tuple(red[SIZE // 2, SIZE // 2]) == (255, 0, 0)  # the image is in the middle
    assert tuple(red[0, 0]) == (255, 255, 255)  # padding above a wide image is white
    transparent = np.zeros((10, 10, 4), dtype=np.uint8)
    assert (decode_image(encode(Image.fromarray(transparent), "PNG"), SIZE) == 255).all()  # alpha -> white


def _png_bomb(side: int) -> bytes:
    """A valid PNG header claiming side x side pixels, with almost no data: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"this is not an image at all", "undecodable"),
        (np.random.default_rng(0).bytes(5000), "undecodable"),
        (encode(Image.fromarray(gradient(200, 200)), "JPEG")[:600], "truncated"),
        (encode(Image.fromarray(gradient(200, 200)), "PNG")[:300], "truncated"),
        (encode(Image.fromarray(gradient()), "GIF"), "unsupported_format"),
        (encode(Image.fromarray(gradient()), "BMP"), "unsupported_format"),
        (_png_bomb(40_000), "decompression_bomb"),
    ],
    ids=["zero", "text", "noise", "truncated_jpeg", "truncated_png", "gif", "bmp", "bomb"],
)
def test_unusable_images_raise_one_error_type_fast(data, reason):
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, SIZE)
    assert info.value.reason == reason
    assert time.perf_counter() - start < 2.0  # never hangs on a bomb


def test_processor_batch_keeps_going_past_bad_images():
    tok = train_tokenizer(["red shirt cotton", "blue jeans denim"] * 20, vocab_size=60)
    proc = ItemProcessor(tok, image_size=SIZE, max_title_len=8)
    good = encode(Image.fromarray(gradient()), "JPEG")
    out = proc(["red shirt", None, "", "blue jeans cotton denim red shirt cotton"], [good, b"junk", None, good])
    assert out["has_image"].tolist() == [True, False, False, True]
    assert out["image_error"].tolist() == [None, "undecodable", None, None]
    assert out["pixel_values"].shape == (4, SIZE, SIZE, 3)
    assert out["input_ids"].shape == (4, 8)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert out["input_ids"][1, :2].tolist() == [cls, sep] and out["attention_mask"][1].sum() == 2  # no title
    assert out["attention_mask"][3].sum() == 8 and out["input_ids"][3, -1] == sep  # truncated, still closed


def test_processor_round_trips(tmp_path):
    tok = train_tokenizer(["red shirt cotton", "blue jeans denim"] * 20, vocab_size=60)
    proc = ItemProcessor(tok, image_size=SIZE, max_title_len=8)
    proc.save_pretrained(str(tmp_path))
    again = ItemProcessor.from_pretrained(str(tmp_path))
    assert (again.image_size, again.max_title_len) == (SIZE, 8)
    np.testing.assert_array_equal(again.tokenize(["red denim"])["input_ids"], proc.tokenize(["red denim"])["input_ids"])


def test_exif_orientation_is_applied():
    """A phone photo stored sideways (EXIF orientation 6: rotate 90 degrees clockwise) is decoded upright."""
    upright = np.zeros((40, 20, 3), dtype=np.uint8)  # tall: 20 wide, 40 high
    upright[:20] = (255, 0, 0)  # red on top
    upright[20:] = (0, 0, 255)  # blue below
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 40 x 20
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif, quality=95)
    pixels = decode_image(buf.getvalue(), 40).astype(int)
    assert pixels[5, 20, 0] > 200 and pixels[5, 20, 2] < 60  # top is red
    assert pixels[35, 20, 2] > 200 and pixels[35, 20, 0] < 60  # bottom is blue
