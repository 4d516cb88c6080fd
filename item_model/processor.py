"""ItemProcessor: titles -> token ids (WordPiece trained on catalog titles) and image bytes -> RGB pixels.

Images leave the processor as uint8 [S, S, 3]: four times smaller than float patches in Ray's object
store and on the way to the GPU; the model normalises and cuts them into patches itself.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP")
PROCESSOR_FILE = "processor_config.json"
# Pixels we agree to decode: a 60 MP photo is real, a 50,000 x 50,000 PNG of 100 KB is a decompression bomb.
MAX_IMAGE_PIXELS = 60_000_000
LETTERBOX_FILL = (255, 255, 255)  # catalog photos are mostly shot on white
# the arrays ItemModel.forward / encode take, in the form ItemProcessor makes them
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "has_image")


class ImageDecodeError(ValueError):
    """An image that is present but unusable. `reason` is one of: empty, undecodable, truncated,
    unsupported_format, decompression_bomb; `detail` says what the decoder saw."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def train_tokenizer(titles: Iterable[str], vocab_size: int = 8000) -> PreTrainedTokenizerFast:
    """Train a BERT-style uncased WordPiece tokenizer on catalog titles (`tokenizers`, in Rust)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False
    )
    tok.train_from_iterator((t for t in titles if t), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )


def decode_image(data: bytes | None, size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 [size, size, 3] RGB, letterboxed (aspect kept, padded).

    Any mode (RGBA, palette, CMYK, grayscale, 16-bit) becomes RGB, turned upright by its EXIF orientation.
    Raises `ImageDecodeError` for
    anything unusable; never returns a partial image and never decodes a decompression bomb.
    """
    if not data:
        raise ImageDecodeError("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format not in SUPPORTED_FORMATS:
                raise ImageDecodeError("unsupported_format", f"{im.format}; expected one of {SUPPORTED_FORMATS}")
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError("decompression_bomb", f"{im.width}x{im.height} pixels")
            # JPEG can decode at 1/2, 1/4, 1/8 scale in the DCT: much faster for large photos
            im.draft("RGB", (size, size))
            im.load()
            # phone photos are stored sideways with an EXIF orientation tag: show them as the camera saw
            im = ImageOps.exif_transpose(im)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("decompression_bomb", str(e)) from None
    except UnidentifiedImageError as e:
        raise ImageDecodeError("undecodable", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated" if "truncated" in str(e).lower() or isinstance(e, EOFError) else "undecodable"
        raise ImageDecodeError(reason, str(e)) from None
    return _letterbox(to_rgb(im), size)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode (palette, alpha, grey, 16-bit grey, CMYK) -> RGB; transparency becomes the letterbox white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits by the image's own range
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / max(hi - lo, 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        # transparent product cut-outs go on the same white as the letterbox
        background = Image.new("RGB", im.size, LETTERBOX_FILL)
        background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return background
    return im.convert("RGB")


def _letterbox(im: Image.Image, size: int) -> np.ndarray:
    scale = size / max(im.width, im.height)
    w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
    im = im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    canvas = Image.new("RGB", (size, size), LETTERBOX_FILL)
    canvas.paste(im, ((size - w) // 2, (size - h) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def has_title(title: object) -> bool:
    """A title the model can read: a string with a non-space character (anything else is embedded as no title)."""
    return isinstance(title, str) and bool(title.strip())


class ItemProcessor:
    """Turns (title, image bytes) rows into the model's inputs. Holds no model state."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_size: int, max_title_len: int) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_title_len = max_title_len

    def tokenize(self, titles: Sequence[str | None]) -> dict[str, np.ndarray]:
        """Titles -> input_ids, attention_mask int64 [B, max_title_len]. None/"" -> [CLS] [SEP]."""
        enc = self.tokenizer(
            [t or "" for t in titles], padding="max_length", truncation=True,
            max_length=self.max_title_len, return_tensors="np",
        )
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}

    def images(self, images: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Image bytes -> (pixel_values uint8 [B, S, S, 3], has_image bool [B], error reason per row).

        A missing image (None) is not an error; an unusable one is recorded by reason and the row
        continues without its image.
        """
        s = self.image_size
        pixels = np.zeros((len(images), s, s, 3), dtype=np.uint8)
        has_image = np.zeros(len(images), dtype=bool)
        errors: list[str | None] = [None] * len(images)
        for i, data in enumerate(images):
            if data is None:
                continue
            try:
                pixels[i] = decode_image(data, s)
                has_image[i] = True
            except ImageDecodeError as e:
                errors[i] = e.reason
        return pixels, has_image, errors

    def __call__(self, titles: Sequence[str | None], images: Sequence[bytes | None]) -> dict[str, np.ndarray]:
        """A batch of rows -> the model's inputs (numpy) plus `image_error` (object array of reasons)."""
        if len(titles) != len(images):
            raise ValueError(f"{len(titles)} titles but {len(images)} images")
        pixels, has_image, errors = self.images(images)
        return {
            **self.tokenize(titles),
            "pixel_values": pixels,
            "has_image": has_image,
            "image_error": np.array(errors, dtype=object),
        }

    def save_pretrained(self, directory: str) -> None:
        self.tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, PROCESSOR_FILE), "w") as f:
            json.dump({"image_size": self.image_size, "max_title_len": self.max_title_len}, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str) -> "ItemProcessor":
        path = os.path.join(directory, PROCESSOR_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory} has no {PROCESSOR_FILE}: it is not an item-pipeline model dir")
        with open(path) as f:
            settings = json.load(f)
        return cls(PreTrainedTokenizerFast.from_pretrained(directory), **settings)
