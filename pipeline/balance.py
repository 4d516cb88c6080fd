"""Modality balance of a night's embeddings: how many rows were embedded from both inputs, title only and
image only, and how far the embedding moves when the title or the photo of a fixed sample is blanked
(eval_metrics.modality_movement: `image_share` 0.5 is balance, near 0 means the photo is ignored).

The sample is the `n` listings (with a title and a usable photo) whose ids hash lowest: the same listings
night after night while they stay in the catalog, so a change in the figures is the model's, not the
sample's.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from item_model import ItemProcessor
from item_model.processor import has_title

from .catalog import ColumnMap, id_as_string, open_dataset
from .encode import Encoder, encode_rows
from .eval_metrics import modality_movement
from .storage import local_dir

SAMPLE_ROWS = 256
FLAG_SHARE_CHANGE = 0.10  # an image share that moves more than this from one night to the next is flagged


def _id_rank(item_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little")


def lowest_hash_ids(catalog_uri: str, id_column: str, k: int) -> list[str]:
    """The `k` distinct ids of a catalog whose hash is lowest, in hash order, streamed batch by batch (held:
    one batch and k ids)."""
    lowest: list[str] = []
    for batch in open_dataset(catalog_uri).to_batches(columns=[id_column]):
        ids = id_as_string(batch.column(0)).drop_null().to_pylist()
        lowest = heapq.nsmallest(k, set(ids).union(lowest), key=_id_rank)
    return lowest


def modality_counts(embeddings_uri: str) -> dict[str, int]:
    """Rows of the whole embedding table (new and carried over) by the inputs they were embedded from."""
    counts = pc.value_counts(open_dataset(embeddings_uri).to_table(columns=["modalities"]).column("modalities"))
    return {v["values"]: v["counts"] for v in counts.to_pylist()}


def modality_balance(catalog_uri: str, columns: ColumnMap, model_dir: str, embeddings_uri: str,
                     n: int = SAMPLE_ROWS) -> dict[str, Any]:
    """Counts by modality and the blanking movement on the fixed sample (see the module docstring)."""
    dataset = open_dataset(catalog_uri)
    candidates = lowest_hash_ids(catalog_uri, columns.item_id, 4 * n)  # some lack a title or a usable photo
    image_col = columns.image if columns.image in dataset.schema.names else None
    result: dict[str, Any] = {"counts": modality_counts(embeddings_uri), "sample": 0}
    if image_col is None or not candidates:  # image_uri catalogs: counts only (no bulk fetch here)
        return result
    table = dataset.to_table(columns=[columns.item_id, columns.title, image_col],
                             filter=pc.field(columns.item_id).cast(pa.string()).isin(candidates))
    rank = {i: r for r, i in enumerate(candidates)}
    rows = sorted(zip(id_as_string(table.column(columns.item_id)).to_pylist(), table.column(columns.title).to_pylist(),
                      table.column(image_col).to_pylist()), key=lambda r: rank[r[0]])
    processor = ItemProcessor.from_pretrained(local_dir(model_dir))
    usable = [(t, im) for _, t, im in rows if has_title(t) and im and processor.images([im])[1][0]][:n]
    if not usable:
        return result
    titles, images = [t for t, _ in usable], [im for _, im in usable]
    encoder = Encoder(model_dir, device="cpu")
    full = encode_rows(encoder, processor, titles, images)
    no_title = encode_rows(encoder, processor, [""] * len(titles), images)
    no_image = encode_rows(encoder, processor, titles, [None] * len(images))
    movement = modality_movement(full, no_title, no_image, np.ones(len(titles), dtype=bool))
    return {**result, "sample": len(titles), **{k: round(v, 4) for k, v in movement.items()}}


def compare_nights(today: dict[str, Any], yesterday: dict[str, Any] | None) -> dict[str, Any]:
    """Today's balance with yesterday's figures beside it, and a flag when the image share moved a lot."""
    if not yesterday or "image_share" not in yesterday or "image_share" not in today:
        return {**today, "previous": yesterday, "flag": None}
    change = today["image_share"] - yesterday["image_share"]
    flag = (f"image share moved {change:+.2f} since the previous run (limit {FLAG_SHARE_CHANGE}): check the model "
            f"and the photos") if abs(change) > FLAG_SHARE_CHANGE else None
    return {**today, "previous": {k: yesterday.get(k) for k in ("title_movement", "image_movement", "image_share", "counts")},
            "flag": flag}
