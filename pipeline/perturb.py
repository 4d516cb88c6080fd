"""Seeded seller-style perturbations that turn a listing (title + image bytes) into a re-listing."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from item_model.processor import to_rgb

# Words sellers shorten; keys are lower-case, values are the shortened spellings seen in the wild.
ABBREVIATIONS: dict[str, tuple[str, ...]] = {
    "black": ("blk",),
    "white": ("wht",),
    "grey": ("gry",),
    "navy": ("nvy",),
    "green": ("grn",),
    "brown": ("brn",),
    "women": ("womens", "wmn"),
    "women's": ("womens", "wmn"),
    "men": ("mens",),
    "men's": ("mens",),
    "t-shirt": ("tee", "tshirt"),
    "sneakers": ("sneaks", "trainers"),
    "leather": ("lthr",),
    "stainless": ("ss",),
    "ceramic": ("cer",),
    "wireless": ("bt", "w/less"),
    "headphones": ("headphone", "cans"),
    "sunglasses": ("shades",),
    "smartphone": ("phone",),
    "striped": ("stripe",),
    "checked": ("check", "plaid"),
    "polka": ("pk",),
    "insulated": ("insul",),
    "edition": ("ed",),
    "original": ("orig",),
}

# Tags sellers glue onto titles to stand out; kept in a tuple so choice order is fixed for a seed.
SELLER_TAGS: tuple[str, ...] = (
    "NEW", "FREE SHIPPING", "[SALE]", "Authentic", "100% Original", "HOT!",
    "** BEST PRICE **", "Fast Dispatch", "Genuine", "Limited Stock",
)

# Case styles a seller may type a title in.
CASE_STYLES: tuple[str, ...] = ("lower", "upper", "title")


@dataclass(frozen=True)
class RelistConfig:
    """Strengths of every perturbation; `RelistConfig.identity()` turns them all off."""

    apply_prob: float = 1.0  # chance each selected perturbation is applied (<1: sellers change only some things)
    # image family
    pad_max: float = 0.15  # max padding added on each side, as a fraction of that side (new background + shift)
    rotation_max_deg: float = 8.0  # max absolute rotation in degrees
    crop_scale_min: float = 0.7  # smallest fraction of the image area kept by the random resized crop (1 = no crop)
    crop_log_ratio_max: float = 0.15  # max |log(aspect ratio change)| of the crop box
    brightness_max: float = 0.25  # brightness factor drawn from [1 - b, 1 + b]
    contrast_max: float = 0.25  # contrast factor drawn from [1 - c, 1 + c]
    jpeg_quality_min: int = 35  # lowest JPEG quality of the re-encode round trip
    jpeg_quality_max: int = 85  # highest JPEG quality of the re-encode round trip
    output_quality: int = 95  # quality of the final JPEG encode; high so it adds little loss of its own
    # title family
    max_word_edits: int = 1  # words dropped or abbreviated per title (0 = none)
    max_word_swaps: int = 2  # pairs of words swapped per title (0 = keep order)
    case_change_prob: float = 1.0  # chance the title's case style is changed
    seller_tag_prob: float = 1.0  # chance a seller tag is added at the start or end
    seller_tags: tuple[str, ...] = SELLER_TAGS  # the tags to draw from

    def __post_init__(self) -> None:
        checks = {
            "apply_prob in [0, 1]": 0.0 <= self.apply_prob <= 1.0,
            "pad_max >= 0": self.pad_max >= 0,
            "rotation_max_deg >= 0": self.rotation_max_deg >= 0,
            "crop_scale_min in (0, 1]": 0.0 < self.crop_scale_min <= 1.0,
            "crop_log_ratio_max >= 0": self.crop_log_ratio_max >= 0,
            "brightness_max in [0, 1)": 0.0 <= self.brightness_max < 1.0,
            "contrast_max in [0, 1)": 0.0 <= self.contrast_max < 1.0,
            "1 <= jpeg_quality_min <= jpeg_quality_max <= 95":
                1 <= self.jpeg_quality_min <= self.jpeg_quality_max <= 95,
            "output_quality in [1, 95]": 1 <= self.output_quality <= 95,
            "max_word_edits >= 0": self.max_word_edits >= 0,
            "max_word_swaps >= 0": self.max_word_swaps >= 0,
            "case_change_prob in [0, 1]": 0.0 <= self.case_change_prob <= 1.0,
            "seller_tag_prob in [0, 1]": 0.0 <= self.seller_tag_prob <= 1.0,
            "seller_tags non-empty when seller_tag_prob > 0": bool(self.seller_tags) or self.seller_tag_prob == 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid RelistConfig: expected {', '.join(failed)}; got {self}")

    @classmethod
    def identity(cls) -> RelistConfig:
        """Zero strength: titles come back unchanged, images only pass through a quality-95 encode."""
        return cls(
            pad_max=0.0, rotation_max_deg=0.0, crop_scale_min=1.0, crop_log_ratio_max=0.0,
            brightness_max=0.0, contrast_max=0.0, jpeg_quality_min=95, jpeg_quality_max=95,
            max_word_edits=0, max_word_swaps=0, case_change_prob=0.0, seller_tag_prob=0.0,
        )


# ---------------------------------------------------------------------------------------------
# image family: PIL RGB image in, PIL RGB image of the same size out


def _background_colour(img: Image.Image) -> tuple[int, int, int]:
    """Median of the four corner pixels: fills rotated corners with the photo's own backdrop."""
    w, h = img.size
    corners = np.array([img.getpixel(xy) for xy in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1))])
    return tuple(int(v) for v in np.median(corners, axis=0))


def pad_background(img: Image.Image, rng: np.random.Generator, cfg: RelistConfig) -> Image.Image:
    """Pad each side by up to `pad_max` with a new plain background colour, then scale back."""
    w, h = img.size
    left, right = (int(v) for v in rng.integers(0, int(cfg.pad_max * w) + 1, size=2))
    top, bottom = (int(v) for v in rng.integers(0, int(cfg.pad_max * h) + 1, size=2))
    colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
    if left + right + top + bottom == 0:
        return img
    canvas = Image.new("RGB", (w + left + right, h + top + bottom), colour)
    canvas.paste(img, (left, top))  # unequal sides shift the product off centre
    return canvas.resize((w, h), Image.Resampling.BICUBIC)


def rotate(img: Image.Image, rng: np.random.Generator, cfg: RelistConfig) -> Image.Image:
    """Rotate by an angle in [-rotation_max_deg, rotation_max_deg], corners filled with the backdrop."""
    angle = float(rng.uniform(-cfg.rotation_max_deg, cfg.rotation_max_deg))
    if angle == 0.0:
        return img
    return img.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=_background_colour(img))


def random_resized_crop(img: Image.Image, rng: np.random.Generator, cfg: RelistConfig) -> Image.Image:
    """Keep a random box of area fraction in [crop_scale_min, 1] and jittered aspect, resized back."""
    w, h = img.size
    scale = float(rng.uniform(cfg.crop_scale_min, 1.0))
    ratio = math.exp(float(rng.uniform(-cfg.crop_log_ratio_max, cfg.crop_log_ratio_max)))
    cw = min(w, max(1, round(w * math.sqrt(scale * ratio))))
    ch = min(h, max(1, round(h * math.sqrt(scale / ratio))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    if (cw, ch) == (w, h):
        return img
    return img.resize((w, h), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))


def brightness_contrast(img: Image.Image, rng: np.random.Generator, cfg: RelistConfig) -> Image.Image:
    """Scale contrast around the mean grey level, then brightness, by factors near 1."""
    contrast = float(rng.uniform(1.0 - cfg.contrast_max, 1.0 + cfg.contrast_max))
    brightness = float(rng.uniform(1.0 - cfg.brightness_max, 1.0 + cfg.brightness_max))
    if contrast == 1.0 and brightness == 1.0:
        return img
    arr = np.asarray(img, dtype=np.float32)
    arr = ((arr - arr.mean()) * contrast + arr.mean()) * brightness
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def jpeg_reencode(img: Image.Image, rng: np.random.Generator, cfg: RelistConfig) -> Image.Image:
    """Round-trip through JPEG at a quality drawn from [jpeg_quality_min, jpeg_quality_max]."""
    quality = int(rng.integers(cfg.jpeg_quality_min, cfg.jpeg_quality_max + 1))
    return Image.open(io.BytesIO(_encode_jpeg(img, quality))).convert("RGB")


# Applied in this order: framing first (as when re-photographed), then colour, then compression.
IMAGE_PERTURBATIONS: dict[str, Callable[[Image.Image, np.random.Generator, RelistConfig], Image.Image]] = {
    "background": pad_background,
    "rotation": rotate,
    "crop": random_resized_crop,
    "color": brightness_contrast,
    "jpeg": jpeg_reencode,
}


# ---------------------------------------------------------------------------------------------
# title family: str in, str out; an empty title stays empty (there is nothing for a seller to edit)


def drop_or_abbreviate(title: str, rng: np.random.Generator, cfg: RelistConfig) -> str:
    """Abbreviate a known word (half the time, when there is one) or drop a word; keeps >= 2 words."""
    words = title.split()
    for _ in range(int(rng.integers(1, cfg.max_word_edits + 1)) if cfg.max_word_edits else 0):
        known = [i for i, word in enumerate(words) if word.lower() in ABBREVIATIONS]
        if known and rng.random() < 0.5:
            i = known[int(rng.integers(len(known)))]
            options = ABBREVIATIONS[words[i].lower()]
            words[i] = _match_case(options[int(rng.integers(len(options)))], words[i])
        elif len(words) > 2:
            del words[int(rng.integers(len(words)))]
    return " ".join(words) if words else title


def reorder_words(title: str, rng: np.random.Generator, cfg: RelistConfig) -> str:
    """Swap between 1 and `max_word_swaps` random pairs of words."""
    words = title.split()
    if len(words) < 2 or cfg.max_word_swaps == 0:
        return title
    for _ in range(int(rng.integers(1, cfg.max_word_swaps + 1))):
        i, j = (int(v) for v in rng.choice(len(words), size=2, replace=False))
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def change_case(title: str, rng: np.random.Generator, cfg: RelistConfig) -> str:
    """With `case_change_prob`, rewrite the title in a case style that differs from the current one."""
    if rng.random() >= cfg.case_change_prob:
        return title
    styled = {"lower": title.lower(), "upper": title.upper(), "title": title.title()}
    changed = [style for style in CASE_STYLES if styled[style] != title]
    return styled[changed[int(rng.integers(len(changed)))]] if changed else title


def add_seller_tag(title: str, rng: np.random.Generator, cfg: RelistConfig) -> str:
    """With `seller_tag_prob`, put a seller tag before or after a non-empty title."""
    if not title or rng.random() >= cfg.seller_tag_prob:
        return title
    tag = cfg.seller_tags[int(rng.integers(len(cfg.seller_tags)))]
    return f"{tag} {title}" if rng.random() < 0.5 else f"{title} {tag}"


# Applied in this order; the tag comes last so the case change does not restyle it.
TITLE_PERTURBATIONS: dict[str, Callable[[str, np.random.Generator, RelistConfig], str]] = {
    "word_edit": drop_or_abbreviate,
    "reorder": reorder_words,
    "case": change_case,
    "seller_tag": add_seller_tag,
}

# Family names accepted by `families=` besides the single perturbation names.
FAMILIES: dict[str, tuple[str, ...]] = {
    "image": tuple(IMAGE_PERTURBATIONS),
    "title": tuple(TITLE_PERTURBATIONS),
}


# ---------------------------------------------------------------------------------------------
# public entry points


def relist_image(
    data: bytes, rng: np.random.Generator, cfg: RelistConfig, families: Iterable[str] | None = None
) -> bytes:
    """Re-photograph encoded image bytes (JPEG, PNG, WebP, ...) and return JPEG bytes of the same size.

    `families` selects perturbations by name (keys of IMAGE_PERTURBATIONS, or "image"); None = all.
    Deterministic for the generator's state. Raises ValueError if `data` is not a decodable image.
    """
    selected = _select(families, IMAGE_PERTURBATIONS)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"relist_image: input is not a decodable image ({err}); filter bad rows first") from err
    img = to_rgb(ImageOps.exif_transpose(img))
    for name, fn in IMAGE_PERTURBATIONS.items():
        if name in selected and rng.random() < cfg.apply_prob:
            img = fn(img, rng, cfg)
    return _encode_jpeg(img, cfg.output_quality)


def relist_title(
    title: str, rng: np.random.Generator, cfg: RelistConfig, families: Iterable[str] | None = None
) -> str:
    """Re-title a listing as another seller would; `families` as in `relist_image` (or "title")."""
    selected = _select(families, TITLE_PERTURBATIONS)
    for name, fn in TITLE_PERTURBATIONS.items():
        if name in selected and rng.random() < cfg.apply_prob:
            title = fn(title, rng, cfg)
    return title


def relist(
    title: str,
    image: bytes | None,
    rng: np.random.Generator,
    cfg: RelistConfig,
    families: Iterable[str] | None = None,
) -> tuple[str, bytes | None]:
    """Make a re-listing (title, JPEG bytes) of one listing; a missing image stays missing.

    `families`: any of "image", "title" and the single perturbation names; None = everything.
    The title is perturbed before the image, so both draw from `rng` in a fixed order.
    """
    names = _expand(families)
    known = [*FAMILIES, *IMAGE_PERTURBATIONS, *TITLE_PERTURBATIONS]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown perturbation(s) {unknown}; choose from {known}")
    title_names = [n for n in names if n in TITLE_PERTURBATIONS]
    image_names = [n for n in names if n in IMAGE_PERTURBATIONS]
    new_title = relist_title(title, rng, cfg, title_names)
    new_image = None if image is None else relist_image(image, rng, cfg, image_names)
    return new_title, new_image


def _expand(families: Iterable[str] | None) -> list[str]:
    """Family names -> perturbation names, in the order given; None -> every perturbation."""
    if families is None:
        return [*IMAGE_PERTURBATIONS, *TITLE_PERTURBATIONS]
    if isinstance(families, str):  # a bare string would otherwise be iterated letter by letter
        families = [families]
    return [name for family in families for name in FAMILIES.get(family, (family,))]


def _select(families: Iterable[str] | None, table: dict[str, Callable]) -> frozenset[str]:
    """Expand `families` and check every name belongs to `table`."""
    names = _expand(families) if families is not None else list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"unknown perturbation(s) {unknown} here; choose from {sorted(table)}")
    return frozenset(names)


def _match_case(word: str, like: str) -> str:
    """Give an abbreviation the case style of the word it replaces."""
    if like.isupper():
        return word.upper()
    return word.capitalize() if like[:1].isupper() else word


def _encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
