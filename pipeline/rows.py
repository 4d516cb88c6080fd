"""Row preparation: catalog rows -> the model's inputs plus each row's verdict. The one place where a row
is validated, hashed, fetched, decoded and tokenised, for the embedding job, for search by a listing and
for pretraining alike, so that a row is prepared for training exactly as it is for embedding.

`Preprocess` knows nothing of Ray: it is a plain callable on an Arrow table, which the jobs hand to Ray
Data's `map_batches` as an instance (stateless tasks that carry the tokenizer with them).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from item_model import MODEL_INPUTS, ImageDecodeError, ItemProcessor, decode_image
from item_model.processor import has_title

from . import storage
from .catalog import ColumnMap, content_hash, id_as_string

OK, REJECT, UNCHANGED = "ok", "reject", "unchanged"
# Columns of the previous embedding table that the incremental embed joins to each catalog row
# (pipeline/embed.py): a row whose content hash equals `_previous_hash` is unchanged; the other
# `_previous_*` columns (its embedding, modalities, embedded_at) pass through to the writer.
PREVIOUS = "_previous_"
PREVIOUS_HASH = PREVIOUS + "hash"


class Preprocess:
    """Catalog rows -> model inputs (numpy) plus each row's status, reason, modalities and content hash.

    A row is rejected when its id is null or empty, or when it has neither a usable title nor a usable
    image (an unusable image on a row with a title only loses the image). When the batch carries the
    previous table's columns (`_previous_hash`, ...: the incremental embed's join), a row whose content
    hash equals its `_previous_hash` is marked unchanged and not decoded, and the `_previous_*` columns
    pass through.
    """

    def __init__(self, processor: ItemProcessor | str, columns: ColumnMap) -> None:
        self.processor = ItemProcessor.from_pretrained(storage.local_dir(processor)) if isinstance(processor, str) else processor
        self.columns = columns

    def _image_bytes(self, table: pa.Table) -> tuple[list[bytes | None], list[str]]:
        """Inline bytes, or bytes fetched from `image_uri` (a failed fetch is an unusable image)."""
        n = table.num_rows
        if self.columns.image in table.column_names:
            return table.column(self.columns.image).to_pylist(), [""] * n
        images: list[bytes | None] = []
        errors: list[str] = []
        for uri in table.column(self.columns.image_uri).to_pylist():
            if not uri:
                images.append(None)
                errors.append("")
                continue
            try:
                images.append(storage.read_bytes(uri))
                errors.append("")
            except Exception as e:  # any storage error: the row continues without its image
                images.append(None)
                errors.append(f"fetch_failed: {type(e).__name__}: {e}")
        return images, errors

    def __call__(self, batch: pa.Table | Mapping[str, Sequence]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        table = batch if isinstance(batch, pa.Table) else pa.table({k: list(v) for k, v in batch.items()})
        ids = id_as_string(table.column(self.columns.item_id)).to_pylist()
        previous = table.column(PREVIOUS_HASH).to_pylist() if PREVIOUS_HASH in table.column_names else [None] * len(ids)
        titles = table.column(self.columns.title).to_pylist()
        images, fetch_errors = self._image_bytes(table)
        n, size = len(ids), self.processor.image_size

        out_id, status, reason, detail, hashes, modalities, image_error = ([""] * n for _ in range(7))
        pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
        has_image = np.zeros(n, dtype=bool)
        for i in range(n):
            item_id, title, image = ids[i], titles[i], images[i]
            if not item_id:  # null or "" id: nothing downstream could refer to the row
                status[i], reason[i], detail[i] = REJECT, "null_id", "" if item_id is None else "empty string id"
                continue
            out_id[i] = item_id
            hashes[i] = content_hash(title, image)
            if previous[i] == hashes[i]:
                status[i] = UNCHANGED
                continue
            if fetch_errors[i]:
                image_error[i] = fetch_errors[i]
            elif image is not None:
                try:
                    pixels[i] = decode_image(image, size)
                    has_image[i] = True
                except ImageDecodeError as e:
                    image_error[i] = str(e)
            with_title = has_title(title)
            if with_title or has_image[i]:
                status[i] = OK
                modalities[i] = "image+title" if with_title and has_image[i] else "title" if with_title else "image"
            elif image_error[i]:
                status[i], reason[i], detail[i] = REJECT, "unusable_image_no_title", image_error[i]
            else:
                status[i], reason[i], detail[i] = REJECT, "no_content", "no title and no image"

        tokens = self.processor.tokenize([t if has_title(t) else "" for t in titles])
        elapsed = time.perf_counter() - start
        obj = lambda xs: np.array(xs, dtype=object)  # noqa: E731 - strings stay Python strings for Arrow
        return {
            "item_id": obj(out_id), "status": obj(status), "stage": obj(["preprocess"] * n),
            "reason": obj(reason), "detail": obj(detail), "content_hash": obj(hashes),
            "modalities": obj(modalities), "image_error": obj(image_error),
            **tokens, "pixel_values": pixels, "has_image": has_image,
            "_preprocess_s": np.full(n, elapsed / max(n, 1)),
            **{name: _as_numpy(table.column(name)) for name in table.column_names
               if name.startswith(PREVIOUS) and name != PREVIOUS_HASH},
        }


class TrainRows:
    """Catalog rows -> model inputs (numpy) plus `keep`: False for the rows the embed job would reject
    (null or empty id; neither a title nor a usable image). Rows are flagged rather than dropped here so
    that the skip count survives streaming; an unusable image on a row with a title only loses the image.

    It lives here, beside Preprocess, rather than with the training loop: Ray pickles it by reference
    into every process that holds the training dataset's plan (Ray Train's controller, its dataset
    manager and split coordinator, the read tasks), and each of them imports its module. This one costs
    ~1.5 s to import; pipeline.pretrain (torch, Ray Train, transformers) ~7 s."""

    def __init__(self, processor: ItemProcessor, columns: ColumnMap) -> None:
        self.prepare = Preprocess(processor, columns)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        rows = self.prepare(batch)
        return {**{k: rows[k] for k in MODEL_INPUTS}, "keep": rows["status"] == OK}


def _as_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A joined column as numpy: a fixed-size list (an embedding) as a [n, D] matrix, zero where null."""
    return storage.embedding_matrix(column) if pa.types.is_fixed_size_list(column.type) else column.to_numpy()
