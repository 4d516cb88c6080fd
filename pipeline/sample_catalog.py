"""Seeded sample marketplace catalog for demos and tests: drawn photos, titles, re-listings, broken rows.

Schema (ARCHITECTURE.md catalog contract plus ground truth for tests and evaluation):

    item_id        string  listing id; null only on `null_id` rows
    title          string  never null; "" means no title
    image          binary  JPEG bytes; null means no image
    category       string  null on ~10% of rows: the backfill targets
    group_id       string  one id per product, shared by all its listings; singletons get their own id
    true_category  string  the category even where `category` is null
    seller         string  which seller listed it; listings of one product have distinct sellers
    defect         string  null on clean rows, else one of DEFECTS

Expected outcome per defect under ARCHITECTURE.md (also in EXPECTED_OUTCOME; clean rows embed image+title):

    corrupt_image    random bytes as image       -> embedded from the title; counted in image_errors
    truncated_image  JPEG cut in half            -> embedded from the title; counted in image_errors
    no_image         valid title, null image     -> embedded from the title (missing modality, not a reject)
    no_title         "" title, valid image       -> embedded from the image (missing modality, not a reject)
    null_id          item_id is null             -> rejected
    no_content       "" title and null image     -> rejected
    duplicate_id     item_id repeats the id of an earlier clean row (file order) -> rejected; the
                     contract does not say whether that earlier row survives, so tests should only
                     assert on the row marked here.

Hard cases (originals only, unperturbed, never given a defect):
    image-only  two products with byte-identical titles (colour and pattern left out of the title)
                that differ only in colour/pattern of the photo: different group_id;
    title-only  two products with byte-identical photos whose titles differ in model code and size:
                different group_id.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.perturb import RelistConfig, relist

N_SELLERS = 40  # size of the seller pool
LISTINGS_PER_PRODUCT = (1, 2, 3, 4)  # a product is listed this many times ...
LISTINGS_PROBS = (0.4, 0.3, 0.2, 0.1)  # ... with these probabilities
HARD_CASE_EVERY = 8  # product slot k*8 is an image-only pair, k*8+4 a title-only pair
UNCATEGORISED_RATE = 0.10  # share of rows whose category is hidden (backfill targets)
BROKEN_RATE = 0.01  # share of rows per reject-or-bad-image defect kind
MISSING_MODALITY_RATE = 0.02  # share of rows per missing-modality kind (no_image, no_title)
MIN_ROWS_FOR_ALL_DEFECTS = 50  # from this size on, every defect kind appears at least once
IMAGE_SIZES = (64, 80, 96)  # square photo side in pixels
JPEG_QUALITY = 90  # quality of the original photos
# Sellers re-list with every perturbation family but each one only some of the time.
SELLER_RELIST = RelistConfig(apply_prob=0.6)

BROKEN_DEFECTS = ("corrupt_image", "truncated_image", "null_id", "no_content", "duplicate_id")
MISSING_DEFECTS = ("no_image", "no_title")
DEFECTS = BROKEN_DEFECTS + MISSING_DEFECTS
# What the embed stage must make of each defect (ARCHITECTURE.md): the `modalities` it embeds, or "reject".
EXPECTED_OUTCOME: dict[str, str] = {
    "corrupt_image": "title", "truncated_image": "title", "no_image": "title", "no_title": "image",
    "null_id": "reject", "no_content": "reject", "duplicate_id": "reject",
}

BRANDS = ("Nordika", "Velora", "Kestrel", "Arbor", "Lumen", "Tidewell", "Oakridge", "Sora",
          "Mistral", "Quill", "Ember", "Halden", "Juno", "Pavo", "Rivet", "Zephyr")
COLOURS: dict[str, tuple[int, int, int]] = {
    "Black": (25, 25, 28), "White": (240, 240, 236), "Red": (200, 30, 40), "Navy": (25, 40, 100),
    "Blue": (50, 110, 210), "Green": (40, 140, 70), "Grey": (128, 128, 132), "Beige": (215, 195, 160),
    "Pink": (235, 130, 170), "Yellow": (240, 200, 40), "Brown": (110, 70, 40), "Orange": (240, 120, 30),
    "Purple": (120, 60, 160),
}
PATTERNS: dict[str, str] = {"plain": "Solid", "stripes": "Striped", "dots": "Polka Dot", "checks": "Checked"}


def _poly(*points: tuple[float, float]) -> Callable[[ImageDraw.ImageDraw, Callable], None]:
    """A shape made of one polygon in unit coordinates."""
    return lambda d, at: d.polygon([at(x, y) for x, y in points], fill=255)


def _draw_cap(d: ImageDraw.ImageDraw, at: Callable) -> None:
    d.pieslice([at(0.15, 0.25), at(0.75, 0.85)], 180, 360, fill=255)  # crown
    d.polygon([at(0.55, 0.55), at(0.95, 0.6), at(0.9, 0.68), at(0.55, 0.62)], fill=255)  # brim


def _draw_bag(d: ImageDraw.ImageDraw, at: Callable) -> None:
    d.ellipse([at(0.3, 0.08), at(0.7, 0.55)], fill=255)  # handle ...
    d.ellipse([at(0.37, 0.15), at(0.63, 0.55)], fill=0)  # ... with its hole
    d.polygon([at(0.15, 0.38), at(0.85, 0.38), at(0.93, 0.95), at(0.07, 0.95)], fill=255)


def _draw_watch(d: ImageDraw.ImageDraw, at: Callable) -> None:
    d.rectangle([at(0.38, 0.02), at(0.62, 0.98)], fill=255)  # strap
    d.ellipse([at(0.2, 0.25), at(0.8, 0.75)], fill=255)  # case
    d.ellipse([at(0.3, 0.35), at(0.7, 0.65)], fill=0)  # face shows the backdrop
    d.line([at(0.5, 0.5), at(0.5, 0.38)], fill=255, width=2)  # hands
    d.line([at(0.5, 0.5), at(0.6, 0.5)], fill=255, width=2)


def _draw_sunglasses(d: ImageDraw.ImageDraw, at: Callable) -> None:
    d.ellipse([at(0.05, 0.35), at(0.45, 0.7)], fill=255)
    d.ellipse([at(0.55, 0.35), at(0.95, 0.7)], fill=255)
    d.rectangle([at(0.4, 0.42), at(0.6, 0.48)], fill=255)  # bridge
    d.rectangle([at(0.02, 0.38), at(0.98, 0.42)], fill=255)  # brow bar


def _draw_mug(d: ImageDraw.ImageDraw, at: Callable) -> None:
    d.ellipse([at(0.55, 0.3), at(0.92, 0.72)], fill=255)  # handle ...
    d.ellipse([at(0.63, 0.4), at(0.84, 0.62)], fill=0)  # ... with its hole
    d.rounded_rectangle([at(0.12, 0.15), at(0.7, 0.9)], radius=4, fill=255)


def _draw_bottle(d: ImageDraw.ImageDraw, at: Callable) -> None:
    d.rectangle([at(0.42, 0.02), at(0.58, 0.12)], fill=255)  # cap
    d.polygon([at(0.44, 0.12), at(0.56, 0.12), at(0.7, 0.3), at(0.3, 0.3)], fill=255)  # shoulder
    d.rounded_rectangle([at(0.3, 0.28), at(0.7, 0.98)], radius=5, fill=255)


def _draw_lamp(d: ImageDraw.ImageDraw, at: Callable) -> None:
    d.polygon([at(0.25, 0.05), at(0.75, 0.05), at(0.9, 0.4), at(0.1, 0.4)], fill=255)  # shade
    d.rectangle([at(0.47, 0.4), at(0.53, 0.88)], fill=255)  # stem
    d.ellipse([at(0.25, 0.84), at(0.75, 0.98)], fill=255)  # base


def _draw_phone(d: ImageDraw.ImageDraw, at: Callable) -> None:
    d.rounded_rectangle([at(0.28, 0.02), at(0.72, 0.98)], radius=5, fill=255)
    d.rectangle([at(0.42, 0.06), at(0.58, 0.08)], fill=0)  # speaker slot


def _draw_headphones(d: ImageDraw.ImageDraw, at: Callable) -> None:
    d.arc([at(0.12, 0.05), at(0.88, 0.9)], 180, 360, fill=255, width=5)  # band
    d.rounded_rectangle([at(0.05, 0.45), at(0.28, 0.85)], radius=4, fill=255)  # ear cups
    d.rounded_rectangle([at(0.72, 0.45), at(0.95, 0.85)], radius=4, fill=255)


@dataclass(frozen=True)
class Category:
    """One category: how its products look and which words their titles use."""

    noun: str  # the product noun in titles
    attributes: tuple[str, ...]  # category-specific words, one per title
    sizes: tuple[str, ...]  # size strings; at least two, so title-only twins can differ in size
    draw: Callable[[ImageDraw.ImageDraw, Callable], None]  # draws the silhouette (255) on a mask


CATEGORIES: dict[str, Category] = {
    "tshirt": Category("T-Shirt", ("Cotton", "Women's", "Men's", "Slim Fit", "Crew Neck"),
                       ("Size S", "Size M", "Size L", "Size XL"),
                       _poly((0.3, 0.1), (0.42, 0.1), (0.5, 0.18), (0.58, 0.1), (0.7, 0.1), (0.95, 0.3),
                             (0.85, 0.42), (0.75, 0.35), (0.75, 0.95), (0.25, 0.95), (0.25, 0.35),
                             (0.15, 0.42), (0.05, 0.3))),
    "dress": Category("Dress", ("Maxi", "Women's", "Summer", "Wrap", "Midi"),
                      ("Size XS", "Size S", "Size M", "Size L"),
                      _poly((0.38, 0.05), (0.45, 0.12), (0.55, 0.12), (0.62, 0.05), (0.66, 0.35), (0.9, 0.95),
                            (0.1, 0.95), (0.34, 0.35))),
    "sneakers": Category("Sneakers", ("Running", "Leather", "Men's", "Women's", "Lace-Up"),
                         ("EU 38", "EU 40", "EU 42", "EU 44"),
                         _poly((0.05, 0.55), (0.1, 0.4), (0.35, 0.45), (0.5, 0.3), (0.62, 0.3), (0.7, 0.55),
                               (0.95, 0.65), (0.95, 0.8), (0.05, 0.8))),
    "cap": Category("Baseball Cap", ("Cotton", "Adjustable", "Trucker", "Washed"), ("One Size", "Kids"), _draw_cap),
    "bag": Category("Tote Bag", ("Leather", "Canvas", "Women's", "Shoulder"), ("Small", "Medium", "Large"), _draw_bag),
    "watch": Category("Watch", ("Stainless Steel", "Analog", "Quartz", "Men's", "Women's"), ("38mm", "40mm", "42mm"),
                      _draw_watch),
    "sunglasses": Category("Sunglasses", ("Polarized", "Aviator", "Retro", "UV400"), ("Standard", "Wide Fit"),
                           _draw_sunglasses),
    "mug": Category("Mug", ("Ceramic", "Travel", "Stoneware", "Enamel"), ("250ml", "350ml", "450ml"), _draw_mug),
    "bottle": Category("Water Bottle", ("Insulated", "Stainless", "Sports", "BPA-Free"), ("500ml", "750ml", "1L"),
                       _draw_bottle),
    "lamp": Category("Desk Lamp", ("LED", "Dimmable", "Adjustable", "Vintage"), ("30cm", "40cm", "50cm"), _draw_lamp),
    "phone": Category("Smartphone", ("Unlocked", "Dual SIM", "5G", "Refurbished"), ("64GB", "128GB", "256GB"),
                      _draw_phone),
    "headphones": Category("Headphones", ("Wireless", "Over-Ear", "Noise Cancelling", "Foldable"),
                           ("Standard", "Kids"), _draw_headphones),
}

SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("title", pa.string()),
    ("image", pa.binary()),
    ("category", pa.string()),
    ("group_id", pa.string()),
    ("true_category", pa.string()),
    ("seller", pa.string()),
    ("defect", pa.string()),
])


@dataclass(frozen=True)
class _Product:
    """Everything that fixes one product's original photo and title."""

    group_id: str
    category: str
    brand: str
    colour: str
    colour2: str  # the pattern's second colour
    pattern: str  # a key of PATTERNS
    attribute: str
    model_code: str
    size: str
    side: int  # photo side in pixels
    look_seed: int  # seeds backdrop texture and framing, so twins can share them
    title_names_colour: bool = True  # image-only twins leave colour and pattern out of the title

    def title(self) -> str:
        looks = [self.colour, PATTERNS[self.pattern]] if self.title_names_colour else []
        noun = CATEGORIES[self.category].noun
        return " ".join([self.brand, *looks, self.attribute, noun, self.model_code, self.size])


def _pattern_fill(product: _Product) -> np.ndarray:
    """[S, S, 3] float array of the product's colour with its pattern in the second colour."""
    s = product.side
    period = max(4, s // 10)
    yy, xx = np.mgrid[0:s, 0:s]
    if product.pattern == "stripes":
        second = (yy // period) % 2 == 1
    elif product.pattern == "dots":
        second = (xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2 < (period / 3) ** 2
    elif product.pattern == "checks":
        second = (xx // period + yy // period) % 2 == 1
    else:
        second = np.zeros((s, s), dtype=bool)
    return np.where(second[..., None], COLOURS[product.colour2], COLOURS[product.colour]).astype(np.float32)


def _render_photo(product: _Product) -> bytes:
    """Draw the product photo: textured backdrop, category silhouette filled with colour and pattern."""
    rng = np.random.default_rng(product.look_seed)
    s = product.side
    # backdrop: a light tone, darker towards the bottom like a table top, with sensor-like noise
    shade = np.linspace(1.0, 0.85, s, dtype=np.float32)[:, None, None]
    backdrop = rng.integers(185, 250, size=3) * shade + rng.normal(0.0, 5.0, size=(s, s, 3))
    # framing: each product sits at its own scale and offset
    width = float(rng.uniform(0.75, 0.92)) * s
    x0, y0 = (float(c) * s - width / 2 for c in 0.5 + rng.uniform(-0.06, 0.06, size=2))
    mask = Image.new("L", (s, s), 0)
    CATEGORIES[product.category].draw(ImageDraw.Draw(mask), lambda u, v: (x0 + u * width, y0 + v * width))
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0  # [S, S, 1]
    pixels = _pattern_fill(product) * alpha + backdrop * (1.0 - alpha)
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class _Catalog:
    """Accumulates products and their listings from one generator, in a fixed draw order."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.rows: list[dict] = []
        self.n_products = 0
        self._codes: set[str] = set()  # membership only; never iterated, so order cannot leak in

    def new_product(self) -> _Product:
        rng = self.rng
        category = list(CATEGORIES)[int(rng.integers(len(CATEGORIES)))]
        spec = CATEGORIES[category]
        colour, colour2 = (list(COLOURS)[int(i)] for i in rng.choice(len(COLOURS), size=2, replace=False))
        brand = BRANDS[int(rng.integers(len(BRANDS)))]
        self.n_products += 1
        return _Product(
            group_id=f"g{self.n_products:06d}", category=category, brand=brand, colour=colour, colour2=colour2,
            pattern=list(PATTERNS)[int(rng.integers(len(PATTERNS)))],
            attribute=spec.attributes[int(rng.integers(len(spec.attributes)))],
            model_code=self.new_code(brand), size=spec.sizes[int(rng.integers(len(spec.sizes)))],
            side=IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))], look_seed=int(rng.integers(2**31)),
        )

    def new_code(self, brand: str) -> str:
        """A model code not used before, e.g. NO-4821."""
        while True:
            code = f"{brand[:2].upper()}-{int(self.rng.integers(1000, 10000))}"
            if code not in self._codes:
                self._codes.add(code)
                return code

    def twin(self, product: _Product, **changes) -> _Product:
        """Another product that copies `product` except for `changes`, under a new group id."""
        self.n_products += 1
        return replace(product, **changes, group_id=f"g{self.n_products:06d}")

    def list_product(self, product: _Product, photo: bytes, hard_case: bool) -> None:
        """The original listing plus 0-3 re-listings by other sellers."""
        rng = self.rng
        n_listings = int(rng.choice(LISTINGS_PER_PRODUCT, p=LISTINGS_PROBS))
        sellers = rng.choice(N_SELLERS, size=n_listings, replace=False)
        title, image = product.title(), photo
        for k, seller in enumerate(sellers):
            if k > 0:
                title, image = relist(product.title(), photo, rng, SELLER_RELIST)
            self.rows.append({
                "title": title, "image": image, "group_id": product.group_id, "true_category": product.category,
                "seller": f"seller-{int(seller):03d}", "protected": hard_case and k == 0,
            })

    def add_slot(self, slot: int) -> None:
        """One product, or a hard-case pair of products on every HARD_CASE_EVERY-th slot."""
        a = self.new_product()
        if slot % HARD_CASE_EVERY == 0:  # image-only pair: same title words, other colour/pattern
            a = replace(a, title_names_colour=False)
            b = self.twin(a, colour=a.colour2, colour2=a.colour, pattern=list(PATTERNS)[
                (list(PATTERNS).index(a.pattern) + 1) % len(PATTERNS)])
            self.list_product(a, _render_photo(a), hard_case=True)
            self.list_product(b, _render_photo(b), hard_case=True)
        elif slot % HARD_CASE_EVERY == HARD_CASE_EVERY // 2:  # title-only pair: one photo, two models
            sizes = CATEGORIES[a.category].sizes
            b = self.twin(a, model_code=self.new_code(a.brand), size=sizes[(sizes.index(a.size) + 1) % len(sizes)])
            photo = _render_photo(a)
            self.list_product(a, photo, hard_case=True)
            self.list_product(b, photo, hard_case=True)
        else:
            self.list_product(a, _render_photo(a), hard_case=False)


def _defect_counts(n_rows: int) -> dict[str, int]:
    """How many rows get each defect: ~BROKEN_RATE / MISSING_MODALITY_RATE, >= 1 from MIN_ROWS_FOR_ALL_DEFECTS."""
    floor = 1 if n_rows >= MIN_ROWS_FOR_ALL_DEFECTS else 0
    rates = {**dict.fromkeys(BROKEN_DEFECTS, BROKEN_RATE), **dict.fromkeys(MISSING_DEFECTS, MISSING_MODALITY_RATE)}
    return {kind: max(floor, round(rate * n_rows)) for kind, rate in rates.items()}


def _break_rows(rows: list[dict], rng: np.random.Generator) -> None:
    """Give some rows a defect in place; hard-case originals are left clean."""
    candidates = [int(i) for i in rng.permutation(len(rows)) if not rows[i]["protected"]]
    counts = _defect_counts(len(rows))
    for kind in DEFECTS:
        if kind == "duplicate_id":
            continue  # needs the other defects in place first, to pick a clean row to copy from
        for i in candidates[: counts[kind]]:
            row = rows[i]
            row["defect"] = kind
            if kind == "corrupt_image":
                row["image"] = rng.bytes(len(row["image"]))
            elif kind == "truncated_image":
                row["image"] = row["image"][: len(row["image"]) // 2]
            elif kind == "null_id":
                row["item_id"] = None
            elif kind in ("no_content", "no_image"):
                row["image"] = None
            if kind in ("no_content", "no_title"):
                row["title"] = ""
        candidates = candidates[counts[kind]:]
    placed = 0
    for i in candidates:
        if placed == counts["duplicate_id"]:
            break
        earlier = [j for j in range(i) if rows[j]["defect"] is None]
        if earlier:
            rows[i]["item_id"] = rows[earlier[int(rng.integers(len(earlier)))]]["item_id"]
            rows[i]["defect"] = "duplicate_id"
            placed += 1


def make_sample_catalog(n_items: int, seed: int) -> pa.Table:
    """A shuffled catalog of exactly `n_items` rows with SCHEMA (see the module docstring).

    Same (n_items, seed) -> identical table, byte for byte; all randomness comes from `seed`.
    """
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    rng = np.random.default_rng(seed)
    catalog = _Catalog(rng)
    slot = 0
    while len(catalog.rows) < n_items:
        catalog.add_slot(slot)
        slot += 1
    # marketplaces list in no particular order: shuffle, then number the rows
    rows = [catalog.rows[int(i)] for i in rng.permutation(n_items)]
    hidden = set(int(i) for i in rng.choice(n_items, size=round(UNCATEGORISED_RATE * n_items), replace=False))
    for i, row in enumerate(rows):
        row.update(item_id=f"item-{i:06d}", defect=None,
                   category=None if i in hidden else row["true_category"])
    _break_rows(rows, rng)
    return pa.Table.from_pydict({name: [row[name] for row in rows] for name in SCHEMA.names}, schema=SCHEMA)


DIR_ROWS_PER_FILE = 500  # rows per part file when the output is a directory (`OUT/`) and no size is given


def write_sample_catalog(out_path: str, n_items: int, seed: int, rows_per_file: int | None = None) -> pa.Table:
    """Generate a catalog and write it as Parquet to a local path that must not exist yet; return the table.

    rows_per_file=None writes one file at `out_path` (with or without a .parquet suffix); otherwise, or when
    `out_path` ends with a slash, `out_path` becomes a directory of `part-00000.parquet`, ... with at most
    `rows_per_file` (default DIR_ROWS_PER_FILE) rows each (one empty part for an empty catalog, so the schema
    is always readable). Written under a temporary name and renamed into place, so a reader never sees half
    a catalog.
    """
    if out_path.endswith(("/", os.sep)):
        out_path = out_path.rstrip("/" + os.sep) or out_path
        rows_per_file = rows_per_file or DIR_ROWS_PER_FILE
    if os.path.exists(out_path):
        raise FileExistsError(f"{out_path} already exists; remove it or choose a new path (nothing is overwritten)")
    if rows_per_file is not None and rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1 or None, got {rows_per_file}")
    table = make_sample_catalog(n_items, seed)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    if rows_per_file is None:
        pq.write_table(table, tmp)
    else:
        os.makedirs(tmp)
        for part, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
            pq.write_table(table.slice(start, rows_per_file), os.path.join(tmp, f"part-{part:05d}.parquet"))
    os.rename(tmp, out_path)
    return table


def summarize_catalog(table: pa.Table) -> str:
    """One line: rows, groups (with re-listings), uncategorised rows, and rows per defect kind."""
    groups = table.column("group_id").value_counts()
    relisted = sum(1 for g in groups.field("counts").to_pylist() if g > 1)
    defects = table.column("defect").to_pylist()
    by_kind = " ".join(f"{kind}={defects.count(kind)}" for kind in DEFECTS)
    return (f"{table.num_rows} rows, {len(groups)} groups ({relisted} listed more than once), "
            f"{table.column('category').null_count} uncategorised, defects: {by_kind}")
