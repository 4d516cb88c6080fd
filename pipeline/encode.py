"""Encoding: prepared model inputs -> unit vectors. The one encode loop, used by the embedding job (as a
Ray actor), by search for a listing that is in no catalog, and by the evaluation.

`Encoder` knows nothing of Ray: the embed job hands the class to Ray Data's `map_batches` with an actor
pool (the model is loaded once per actor); everything else calls it in process.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from item_model import MODEL_INPUTS, ItemProcessor, load_model_dir

from . import storage
from .catalog import ColumnMap
from .rows import OK, Preprocess

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where the device multiplies bf16 natively (CUDA; a CPU with AVX512-BF16 or AMX: about
    twice fp32's speed there, with cosines to the fp32 vectors >= 0.9998: bench/bench_precision.py), else
    "fp32"; "fp32" and "bf16" stay as they are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    native = (getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16" if any(native) else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass under `precision` (resolved): bf16 autocast, or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


class Encoder:
    """A model on a device. `encode(inputs)` maps model inputs (numpy, as the processor makes them) to
    [B, D] float32 unit vectors; `__call__(batch) -> batch` (the embed job's actor) adds `embedding` for
    the rows with status ok (zeros elsewhere) and drops the model inputs. `precision` (resolve_precision):
    bf16 autocast or fp32 (the model's centring and whitening are fp32 either way). GPU: pinned memory,
    non-blocking copies. CPU: `num_threads` torch threads."""

    def __init__(self, model_dir: str, device: str | None = None, num_threads: int | None = None,
                 precision: str = "auto") -> None:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if num_threads:
            torch.set_num_threads(num_threads)
        # torch's CPU kernels (MKL loads them lazily, by dlopen) before any object-store client is loaded:
        # loaded after the S3 stack, that dlopen can fail and MKL then exits the process
        torch.ones(2, 2) @ torch.ones(2, 2)
        self._use(load_model_dir(storage.local_dir(model_dir), device)[0], device, precision)

    @classmethod
    def of(cls, model: torch.nn.Module, device: str | torch.device = "cpu", precision: str = "auto") -> "Encoder":
        """An encoder over a model already in memory (a start, or a pooling variant of a model dir)."""
        encoder = cls.__new__(cls)
        encoder._use(model.to(device), torch.device(device), precision)
        return encoder

    def _use(self, model: torch.nn.Module, device: torch.device, precision: str) -> None:
        self.model, self.device = model.eval(), device
        self.precision = resolve_precision(precision, device)
        self.dim = model.embedding_dim

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        if not array.flags.writeable or not array.flags.c_contiguous:  # Ray hands out read-only views
            array = np.ascontiguousarray(array).copy()
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def encode(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Model inputs (numpy) -> [B, D] float32 unit vectors."""
        tensors = {k: self._to_device(inputs[k]) for k in MODEL_INPUTS}
        with torch.inference_mode(), autocast(self.precision, self.device):
            return self.model.encode(**tensors).float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        ok = np.asarray(batch["status"] == OK)
        n = len(ok)
        embedding = np.zeros((n, self.dim), dtype=np.float32)
        if ok.all():
            embedding[:] = self.encode(batch)
        elif ok.any():
            rows = np.flatnonzero(ok)
            embedding[rows] = self.encode({k: batch[k][rows] for k in MODEL_INPUTS})
        out = {k: v for k, v in batch.items() if k not in MODEL_INPUTS}
        out["embedding"] = embedding
        out["_encode_s"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        out["_precision"] = np.full(n, self.precision, dtype=object)
        return out


def encode_rows(encoder: Encoder, processor: ItemProcessor, titles: Sequence[str | None],
                images: Sequence[bytes | None], batch_size: int = 64) -> np.ndarray:
    """(titles, image bytes) -> [N, D], in batches of `batch_size`, every CPU core: the evaluation's
    embedder. Unusable images are embedded as missing (the processor's rule)."""
    if len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles but {len(images)} images")
    if encoder.device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    out = np.zeros((len(titles), encoder.dim), dtype=np.float32)
    for start in range(0, len(titles), batch_size):
        out[start : start + batch_size] = encoder.encode(
            processor(titles[start : start + batch_size], images[start : start + batch_size]))
    return out


def table_precision(embeddings_uri: str) -> str:
    """The precision the rows of a published embedding table were embedded at, from its manifest, so that a
    query is embedded as they were ("auto" for a table that names none, or several)."""
    counts = storage.read_manifest(embeddings_uri).get("precision") or {}
    return next(iter(counts)) if len(counts) == 1 else "auto"


def embed_listing(model_dir: str, title: str | None, image: bytes | None, precision: str = "auto") -> np.ndarray:
    """One listing (not in any catalog) -> [1, D], exactly as the job would embed it (the same Preprocess
    and Encoder). Raises ValueError when the job would reject it (no usable title, no usable image)."""
    row = pa.table({"item_id": ["query"], "title": pa.array([title], pa.string()), "image": pa.array([image], pa.binary())})
    prepared = Preprocess(model_dir, ColumnMap())(row)
    if prepared["status"][0] != OK:
        reason = prepared["image_error"][0] or "no image"
        raise ValueError(f"the listing has no usable title and no usable image ({reason})")
    return Encoder(model_dir, device="cpu", precision=precision).encode(prepared)
