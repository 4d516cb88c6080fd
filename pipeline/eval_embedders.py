"""Embedders for the evaluation: anything that maps (titles, image bytes) to L2-normalised float32 vectors,
an all-zero row where it has nothing to go on (an empty title for TF-IDF, no usable image for pHash).

An ITEm model dir or start goes through the embed job's own encoder (pipeline/encode.py); TF-IDF is
scikit-learn's; the perceptual hash is the `imagehash` package's phash, in numpy.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Protocol

import numpy as np
from PIL import Image
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

from pipeline.encode import Encoder, encode_rows
from pipeline.storage import local_dir


class Embedder(Protocol):
    """(titles, image bytes) -> [N, D] float32, each row L2-normalised or all zero ("no answer")."""

    def __call__(self, titles: Sequence[str | None], images: Sequence[bytes | None]) -> np.ndarray: ...


def model_embedder(model_dir: str, batch_size: int = 64, device: str = "cpu") -> Embedder:
    """An ITEm model dir as an embedder: the processor, then encode.Encoder (the embed job's encoder)."""
    from item_model import ItemProcessor

    return loaded_model_embedder(Encoder(model_dir, device), ItemProcessor.from_pretrained(local_dir(model_dir)), batch_size)


def start_embedder(start: str = "minilm", batch_size: int = 64) -> Embedder:
    """The pretrained start used as it is on titles alone (item_model.starts.start_title_encoder)."""
    from item_model.starts import start_title_encoder

    model, processor = start_title_encoder(start)
    return loaded_model_embedder(Encoder.of(model), processor, batch_size)


def loaded_model_embedder(encoder: Encoder, processor, batch_size: int = 64) -> Embedder:
    """An encoder and its processor as an embedder (encode.encode_rows): unusable images are embedded as
    missing (the processor's rule); every CPU core."""
    return partial(encode_rows, encoder, processor, batch_size=batch_size)


def tfidf_embedder(fit_titles: Sequence[str | None], dim: int = 4096, ngram: tuple[int, int] = (3, 5)) -> Embedder:
    """TF-IDF over title character n-grams (lower-cased, whitespace collapsed, padded by a space), hashed
    into `dim` dense dimensions: scikit-learn's HashingVectorizer + TfidfTransformer (smooth idf, fitted on
    `fit_titles`, L2 norm); the image is ignored. At 4096 dims a title of ~100 n-grams collides with itself
    rarely, which is what duplicate search needs.
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    hashing = HashingVectorizer(analyzer="char", ngram_range=ngram, n_features=dim, alternate_sign=False,
                                norm=None, preprocessor=_padded, dtype=np.float32)
    idf = TfidfTransformer(smooth_idf=True).fit(hashing.transform([t or "" for t in fit_titles]))

    def embed(titles: Sequence[str | None], images: Sequence[bytes | None]) -> np.ndarray:
        return idf.transform(hashing.transform([t or "" for t in titles])).astype(np.float32).toarray()

    return embed


def _padded(title: str) -> str:
    text = " ".join(title.lower().split())
    return f" {text} " if text else ""


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix [n, n]: `m @ x` transforms the columns of x."""
    k, i = np.mgrid[0:n, 0:n]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash_bits(data: bytes | None) -> np.ndarray | None:
    """The 64-bit DCT perceptual hash (as the `imagehash` package's phash) as bool [64]; None if unusable.

    Grey, resized to 32 x 32, 2-D DCT, the 8 x 8 lowest frequencies, each bit = coefficient > their median.
    """
    if not data:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        img.draft("L", (64, 64))  # JPEG decodes at reduced scale: the hash needs only 32 x 32
        grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8]
    return (low > np.median(low)).ravel()


def phash_embedder() -> Embedder:
    """Perceptual hash of the image as a +-1/8 vector [64]: inner product = 1 - 2 * Hamming / 64.

    The title is ignored; a missing or undecodable image gives a zero row.
    """

    def embed(titles: Sequence[str | None], images: Sequence[bytes | None]) -> np.ndarray:
        out = np.zeros((len(images), 64), dtype=np.float32)
        for i, data in enumerate(images):
            bits = phash_bits(data)
            if bits is not None:
                out[i] = np.where(bits, 1.0, -1.0) / 8.0
        return out

    return embed


BASELINES: dict[str, Callable[[Sequence[str | None]], Embedder]] = {
    "tfidf": lambda titles: tfidf_embedder(titles),
    "phash": lambda titles: phash_embedder(),
    # the pretrained text encoder ITEm starts from, untrained, on titles alone (needs the minilm extra)
    "minilm": lambda titles: start_embedder("minilm"),
}


def baseline_embedders(names: Iterable[str], catalog_titles: Sequence[str | None]) -> dict[str, Embedder]:
    """The named non-learned references (keys of BASELINES), fitted on the catalog's titles where they fit."""
    names = list(names)
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {sorted(BASELINES)}")
    return {name: BASELINES[name](catalog_titles) for name in names}
