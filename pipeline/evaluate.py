"""Evaluation: duplicate search, category prediction and modality balance of any embedder, side by side.

The measurements of EVALUATION.md, computed from embeddings with exact FAISS inner-product search
(no Ray). An *embedder* is anything that maps (titles, image bytes) to L2-normalised float32 vectors:
an ITEm model dir (`model_embedder`), or a non-learned reference (`tfidf_embedder`, `phash_embedder`).
An embedder returns an all-zero row where it has nothing to go on (an empty title for TF-IDF, no
usable image for pHash); such a query answers nothing and counts as a miss.

Definitions used throughout:

- recall@k: share of queries with at least one hit among their top k results (the usual product
  retrieval definition; with pairs, the common case, it equals the share of hits found).
- mAP@10: mean over queries of AP@10 = sum over ranks r <= 10 of precision@r at each hit,
  divided by min(number of hits that exist, 10).
- blanked runs: queries are embedded with the title replaced by "" (title_blank) or the image
  replaced by None (image_blank); the gallery is always embedded from full inputs.
- modality movement: 1 - mean cosine(full embedding, blanked embedding) over rows that have both a
  title and image bytes. `title_movement` is how far blanking the title moves a row, `image_movement`
  the same for the image; `image_share` = image_movement / (title_movement + image_movement):
  0.5 is balance, near 0 means the embedding ignores the image.
"""

from __future__ import annotations

import io
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pa_dataset
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from pipeline.backfill import precision_coverage as backfill_curve
from pipeline.backfill import vote
from pipeline.perturb import RelistConfig, relist
from pipeline.storage import get_fs

MAX_K = 10  # recall@k curves run k = 1..MAX_K
# re-listing query sets, each a `families=` argument of perturb.relist
RELIST_FAMILIES: dict[str, tuple[str, ...]] = {"image": ("image",), "title": ("title",), "both": ("image", "title")}
VARIANTS = ("full", "title_blank", "image_blank")
Blank = Literal["title", "image"]


class Embedder(Protocol):
    """(titles, image bytes) -> [N, D] float32, each row L2-normalised or all zero ("no answer")."""

    def __call__(self, titles: Sequence[str | None], images: Sequence[bytes | None]) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# search


def _search(
    gallery: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, gallery row ids), both [Q, k], by inner product; id -1 (score 0) where there is none.

    `exclude[q]` (a gallery row, e.g. the query itself) is never returned. Zero queries get no
    results: a tie over the whole gallery would otherwise rank rows by storage order.
    """
    scores = np.zeros((len(queries), k), dtype=np.float32)
    out = np.full((len(queries), k), -1, dtype=np.int64)
    live = np.flatnonzero(np.abs(queries).sum(axis=1) > 0)
    if len(live) == 0 or len(gallery) == 0:
        return scores, out
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    extra = 0 if exclude is None else 1
    found, ids = index.search(np.ascontiguousarray(queries[live], dtype=np.float32), min(k + extra, len(gallery)))
    if exclude is not None:
        # identical vectors tie with the query's own row, so self is not always at rank 0: move it last by id
        ids = np.where(ids == exclude[live][:, None], -1, ids)
        order = np.argsort(ids < 0, axis=1, kind="stable")
        ids, found = np.take_along_axis(ids, order, axis=1), np.take_along_axis(found, order, axis=1)
    n = min(k, ids.shape[1])
    out[live, :n] = ids[:, :n]
    scores[live, :n] = np.where(ids[:, :n] >= 0, found[:, :n], 0.0)
    return scores, out


def _retrieval_metrics(hits: np.ndarray, n_relevant: np.ndarray) -> dict[str, float | list[float]]:
    """hits [Q, MAX_K] bool, n_relevant [Q] -> recall@1, recall@10, map@10, recall curve k=1..MAX_K."""
    if len(hits) == 0:
        nan = float("nan")
        return {"recall@1": nan, "recall@10": nan, "map@10": nan, "n_queries": 0, "recall_curve": [nan] * MAX_K}
    curve = np.logical_or.accumulate(hits, axis=1).mean(axis=0)  # [MAX_K]
    ranks = np.arange(1, hits.shape[1] + 1)
    precision_at = np.cumsum(hits, axis=1) / ranks  # [Q, MAX_K]
    ap = (precision_at * hits).sum(axis=1) / np.minimum(n_relevant, hits.shape[1])
    return {
        "recall@1": float(curve[0]), "recall@10": float(curve[-1]), "map@10": float(ap.mean()),
        "n_queries": int(len(hits)), "recall_curve": [float(v) for v in curve],
    }


def _group_codes(group_ids: Sequence[object]) -> np.ndarray:
    """Group ids -> int codes; None/NaN (no group) -> a code of its own per row."""
    codes: dict[object, int] = {}
    out = np.empty(len(group_ids), dtype=np.int64)
    for i, g in enumerate(group_ids):
        if g is None or (isinstance(g, float) and np.isnan(g)):
            out[i] = -1 - i  # singletons never match anything
        else:
            out[i] = codes.setdefault(g, len(codes))
    return out


def esp_natural(
    emb: np.ndarray, group_ids: Sequence[object], query_emb: np.ndarray | None = None
) -> dict[str, float | list[float]]:
    """Natural-duplicate search: every row of a group with >= 2 members queries the rest of the catalog.

    `emb` [N, D] is the gallery; `query_emb` (default `emb`) gives the queries' vectors, e.g. from
    blanked inputs; row i's own gallery entry is never a result. Hits are the other members of the
    query's group; None/NaN group ids are singletons. Returns recall@1, recall@10, map@10, n_queries
    and recall_curve (k = 1..10).
    """
    codes = _group_codes(group_ids)
    _, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    size = counts[inverse]
    queries = np.flatnonzero(size >= 2)
    q_emb = emb if query_emb is None else query_emb
    _, ids = _search(emb, q_emb[queries], MAX_K, exclude=queries)
    hits = (ids >= 0) & (codes[np.maximum(ids, 0)] == codes[queries][:, None])
    return _retrieval_metrics(hits, size[queries] - 1)


def esp_relisting(
    catalog_emb: np.ndarray,
    relist_emb: np.ndarray,
    original_index: np.ndarray,
    group_ids: Sequence[object] | None = None,
) -> dict[str, float | list[float]]:
    """Re-listing search: query = a re-listing, gallery = the catalog, hit = the listing it was made from.

    With `group_ids`, any catalog row of the original's group is a hit too (it is the same product,
    e.g. a byte-identical photo listed twice). Returns recall@1, recall@10, map@10, n_queries, recall_curve.
    """
    original_index = np.asarray(original_index, dtype=np.int64)
    _, ids = _search(catalog_emb, relist_emb, MAX_K)
    found = np.maximum(ids, 0)
    hits = (ids >= 0) & (found == original_index[:, None])
    n_relevant = np.ones(len(original_index), dtype=np.int64)
    if group_ids is not None:
        codes = _group_codes(group_ids)
        hits |= (ids >= 0) & (codes[found] == codes[original_index][:, None])
        _, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
        n_relevant = counts[inverse][original_index]
    return _retrieval_metrics(hits, n_relevant)


# ---------------------------------------------------------------------------------------------
# re-listing queries and blanked inputs


def make_relistings(
    table: pa.Table,
    n: int,
    seed: int,
    cfg: RelistConfig,
    families: Iterable[str] | None,
    title_col: str = "title",
    image_col: str = "image",
) -> tuple[list[str], list[bytes], np.ndarray]:
    """Up to `n` re-listings of catalog rows that have a title and a decodable image.

    Returns (titles, images, original_row_index). The originals depend only on (table, n, seed), so
    query sets made with other `families` (see perturb.relist) are paired row for row. Rows whose
    image cannot be decoded are skipped, not re-listed.
    """
    titles = table.column(title_col).to_pylist()
    images = table.column(image_col).to_pylist()
    order = np.random.default_rng(seed).permutation(len(titles))
    rng = np.random.default_rng([seed, 1])  # perturbation draws, apart from the choice of originals
    out_titles: list[str] = []
    out_images: list[bytes] = []
    originals: list[int] = []
    for i in order:
        if len(originals) == n:
            break
        if not titles[i] or images[i] is None:
            continue
        try:
            title, image = relist(titles[i], images[i], np.random.default_rng(rng.integers(2**63)), cfg, families)
        except ValueError:  # undecodable image: no original to re-photograph
            continue
        out_titles.append(title)
        out_images.append(image)
        originals.append(int(i))
    return out_titles, out_images, np.array(originals, dtype=np.int64)


def blank_inputs(
    titles: Sequence[str | None], images: Sequence[bytes | None], blank: Blank
) -> tuple[list[str | None], list[bytes | None]]:
    """The same rows with one modality removed: titles -> "" (blank="title") or images -> None ("image")."""
    if blank == "title":
        return [""] * len(titles), list(images)
    if blank == "image":
        return list(titles), [None] * len(images)
    raise ValueError(f"blank must be 'title' or 'image', got {blank!r}")


def _variant_inputs(titles: Sequence[str | None], images: Sequence[bytes | None], variant: str):
    return (list(titles), list(images)) if variant == "full" else blank_inputs(titles, images, variant.split("_")[0])


# ---------------------------------------------------------------------------------------------
# category prediction


def macro_f1(true: Sequence[str], predicted: Sequence[str | None]) -> float:
    """Unweighted mean F1 over every class that is true or predicted somewhere (as scikit-learn's)."""
    true_a, pred_a = np.asarray(true, dtype=object), np.asarray(predicted, dtype=object)
    classes = {c for c in [*true_a, *pred_a] if c is not None}
    scores = []
    for c in classes:
        tp = np.sum((true_a == c) & (pred_a == c))
        denom = np.sum(true_a == c) + np.sum(pred_a == c)  # 2TP + FP + FN
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def knn_vote_loo(
    emb: np.ndarray,
    labels: Sequence[str | None],
    k: int = 10,
    query_emb: np.ndarray | None = None,
    max_queries: int | None = None,
    seed: int = 0,
) -> dict:
    """Leave-one-out, cosine-weighted k-NN vote of the category over the labelled rows.

    Each labelled row (or a seeded sample of `max_queries` of them) is predicted from its k nearest
    other labelled rows, weighted by max(cosine, 0); confidence = the winner's weight share.
    `query_emb` replaces the queries' vectors (blanked runs). Rows with label None are neither
    queries nor neighbours. Returns accuracy, macro_f1, n_queries, and per query `confidence` and
    `correct` lists (for the precision/coverage curve).
    """
    labelled = np.array([i for i, y in enumerate(labels) if y is not None], dtype=np.int64)
    y = np.array([labels[i] for i in labelled], dtype=object)
    queries = np.arange(len(labelled))
    if max_queries is not None and max_queries < len(queries):
        queries = np.sort(np.random.default_rng(seed).choice(len(queries), max_queries, replace=False))
    gallery = emb[labelled]
    q_emb = (emb if query_emb is None else query_emb)[labelled[queries]]
    scores, ids = _search(gallery, q_emb, k, exclude=queries)
    classes, codes = np.unique(y.astype(str), return_inverse=True)
    neighbour_codes = np.where(ids >= 0, codes[np.clip(ids, 0, None)], -1)
    winner, confidence, _ = vote(neighbour_codes, scores, len(classes))  # the backfill job's own vote
    predicted = [classes[w] if w >= 0 else None for w in winner]
    truth = y[queries]
    correct = [p == t for p, t in zip(predicted, truth)]
    return {
        "accuracy": float(np.mean(correct)) if correct else float("nan"),
        "macro_f1": macro_f1(list(truth), predicted),
        "n_queries": int(len(queries)),
        "confidence": confidence,
        "correct": correct,
    }


def precision_coverage(
    confidence: Sequence[float], correct: Sequence[bool], thresholds: Sequence[float]
) -> dict[str, list[float]]:
    """Backfill trade-off: at each threshold, share of rows filled (coverage) and share filled right."""
    curve = backfill_curve(np.asarray(correct, dtype=bool), np.asarray(confidence, dtype=float), np.asarray(thresholds))
    return {key: [point[key] for point in curve] for key in ("threshold", "coverage", "precision")}


def linear_probe(
    emb: np.ndarray,
    labels: Sequence[str | None],
    seed: int = 0,
    test_fraction: float = 0.2,
    l2: float = 1e-4,
    max_iter: int = 100,
    max_train: int | None = 10_000,
    query_embs: dict[str, np.ndarray] | None = None,
) -> dict:
    """Multinomial logistic regression on frozen embeddings, scored on a held-out split.

    Labelled rows are split by a seeded permutation; at most `max_train` of the training split are
    used (the cost grows with rows x D x classes per L-BFGS step); features are standardised with the training
    split's statistics; full-batch L-BFGS on mean cross-entropy + l2/2 * |W|^2 from zero weights, so
    the result is deterministic. A test class never seen in training, or a zero query vector (no
    answer), counts as an error.
    Returns accuracy, macro_f1, n_train, n_test; and with `query_embs` (name -> [N, D], e.g. blanked
    inputs) also `queries`: name -> {accuracy, macro_f1} of the same probe scored on those vectors.
    """
    labelled = np.array([i for i, y in enumerate(labels) if y is not None], dtype=np.int64)
    order = labelled[np.random.default_rng(seed).permutation(len(labelled))]
    n_test = int(round(test_fraction * len(order)))
    test, train = order[:n_test], order[n_test:][:max_train]
    classes = sorted({labels[i] for i in train})
    index = {c: j for j, c in enumerate(classes)}
    x = torch.from_numpy(np.asarray(emb[train], dtype=np.float32))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    target = torch.tensor([index[labels[i]] for i in train])
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, target) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    truth = [labels[i] for i in test]

    def score(source: np.ndarray) -> dict[str, float | None]:
        rows = np.asarray(source[test], dtype=np.float32)
        with torch.no_grad():
            best = (((torch.from_numpy(rows) - mean) / std) @ weight + bias).argmax(1).tolist()
        # a zero vector is "no answer" here as in search, not the class prior
        predicted = [classes[j] if rows[r].any() else None for r, j in enumerate(best)]
        accuracy = float(np.mean([p == t for p, t in zip(predicted, truth)])) if truth else float("nan")
        return {"accuracy": accuracy, "macro_f1": macro_f1(truth, predicted)}

    result: dict = {**score(emb), "n_train": int(len(train)), "n_test": int(len(test))}
    if query_embs:
        result["queries"] = {name: score(q) for name, q in query_embs.items()}
    return result


def modality_movement(full: np.ndarray, title_blank: np.ndarray, image_blank: np.ndarray, both: np.ndarray) -> dict:
    """How far blanking each modality moves the embedding (module docstring).

    Averaged over rows marked in `both` [N] bool (a title and image bytes present) whose full
    embedding is non-zero (an embedder that could not read the row has nothing to move).
    """
    both = both & full.any(axis=1)
    if not both.any():
        return {"title_movement": float("nan"), "image_movement": float("nan"), "image_share": float("nan")}
    title = 1.0 - float(np.mean(np.sum(full[both] * title_blank[both], axis=1)))
    image = 1.0 - float(np.mean(np.sum(full[both] * image_blank[both], axis=1)))
    share = image / (title + image) if title + image > 0 else float("nan")
    return {"title_movement": title, "image_movement": image, "image_share": share}


# ---------------------------------------------------------------------------------------------
# embedders


def model_embedder(model_dir: str, batch_size: int = 64, device: str = "cpu") -> Embedder:
    """An ITEm model dir as an embedder, through the public API only (load_model_dir, processor, encode)."""
    from item_model import load_model_dir  # the pipeline side needs the model only when a model is evaluated

    model, processor = load_model_dir(model_dir, device)
    return loaded_model_embedder(model, processor, batch_size, device)


def start_embedder(start: str = "minilm", batch_size: int = 64) -> Embedder:
    """The pretrained start used as it is on titles alone (item_model.starts.start_title_encoder)."""
    from item_model.starts import start_title_encoder

    return loaded_model_embedder(*start_title_encoder(start), batch_size)


def loaded_model_embedder(model, processor, batch_size: int = 64, device: str = "cpu") -> Embedder:
    """A loaded model and its processor as an embedder: the processor on the CPU, `model.encode` on
    `device`; unusable images are embedded as missing (the processor's rule). Uses every CPU core."""
    torch.set_num_threads(os.cpu_count() or 1)

    def embed(titles: Sequence[str | None], images: Sequence[bytes | None]) -> np.ndarray:
        if len(titles) != len(images):
            raise ValueError(f"{len(titles)} titles but {len(images)} images")
        out = np.zeros((len(titles), model.embedding_dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(titles), batch_size):
                batch = processor(titles[start : start + batch_size], images[start : start + batch_size])
                inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items() if k != "image_error"}
                out[start : start + batch_size] = model.encode(**inputs).float().cpu().numpy()
        return out

    return embed


_HASH_BASE = np.uint64(1_000_003)  # polynomial rolling hash of code points; uint64 wraps around
_HASH_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top bits of h * golden ratio are well spread


def _ngram_buckets(title: str | None, ngram: tuple[int, int], bits: int) -> np.ndarray:
    """Hashed character n-grams (lower-cased, whitespace collapsed, padded by a space) -> bucket ids."""
    text = f" {' '.join((title or '').lower().split())} "
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    hashes = []
    with np.errstate(over="ignore"):
        for n in range(ngram[0], ngram[1] + 1):
            if len(codes) < n or not text.strip():
                continue
            windows = sliding_window_view(codes, n)  # [L - n + 1, n]
            h = np.full(len(windows), n, dtype=np.uint64)  # n seeds the hash: a 3-gram never equals a 4-gram
            for j in range(n):
                h = h * _HASH_BASE + windows[:, j]
            hashes.append((h * _HASH_MIX) >> np.uint64(64 - bits))
    return np.concatenate(hashes).astype(np.int64) if hashes else np.zeros(0, dtype=np.int64)


def tfidf_embedder(fit_titles: Sequence[str | None], dim: int = 4096, ngram: tuple[int, int] = (3, 5)) -> Embedder:
    """TF-IDF over title character n-grams, hashed into `dim` (a power of two) dense dimensions.

    IDF is fitted on `fit_titles` (smooth: log((1 + N) / (1 + df)) + 1, as scikit-learn's); the
    image is ignored. Hash collisions blur rare n-grams a little; at 4096 dims a title of ~100
    n-grams collides with itself rarely, which is what duplicate search needs.
    """
    bits = int(dim).bit_length() - 1
    if dim < 2 or 1 << bits != dim:
        raise ValueError(f"dim must be a power of two >= 2, got {dim}")
    df = np.zeros(dim, dtype=np.float64)
    for title in fit_titles:
        df[np.unique(_ngram_buckets(title, ngram, bits))] += 1
    idf = (np.log((1 + len(fit_titles)) / (1 + df)) + 1).astype(np.float32)

    def embed(titles: Sequence[str | None], images: Sequence[bytes | None]) -> np.ndarray:
        out = np.zeros((len(titles), dim), dtype=np.float32)
        for i, title in enumerate(titles):
            np.add.at(out[i], _ngram_buckets(title, ngram, bits), 1.0)
        out *= idf
        return _l2_normalise(out)

    return embed


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


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


# ---------------------------------------------------------------------------------------------
# the whole comparison


@dataclass(frozen=True)
class EvalOptions:
    """What is measured and on which columns; defaults fit the generated catalog (sample_catalog)."""

    title_col: str = "title"
    image_col: str = "image"
    group_col: str = "group_id"  # ground-truth product groups; null = a listing alone
    label_col: str = "true_category"  # the category to predict; null = unlabelled
    relistings: int = 500  # re-listing queries per family
    relist_config: RelistConfig = field(default_factory=RelistConfig)
    seed: int = 0  # seeds re-listings, the k-NN query sample and the probe split
    knn_k: int = 10
    knn_max_queries: int | None = 5000  # k-NN vote on a seeded sample of labelled rows (None: all)
    probe_test_fraction: float = 0.2
    probe_max_train: int | None = 10_000  # probe training rows, taken from the training split (None: all)
    thresholds: tuple[float, ...] = tuple(np.round(np.arange(0.0, 1.0, 0.05), 2))  # backfill curve


@dataclass
class ModelResult:
    """Everything measured for one embedder."""

    name: str
    metrics: dict[str, dict[str, float]]  # variant (VARIANTS) -> flat metric name -> value
    recall_curves: dict[str, list[float]]  # "natural" / "relist_<family>" -> recall@1..10, full inputs
    backfill: dict[str, list[float]]  # threshold, coverage, precision of the full-input k-NN vote
    dominance: dict[str, float]  # modality_movement
    seconds: dict[str, float]  # embed, metrics


@dataclass
class EvalResults:
    models: list[ModelResult]
    info: dict[str, object]  # catalog, n_rows, seed, options, machine, wall_s; the CLI adds its command

    def to_dict(self) -> dict:
        return asdict(self)


def check_columns(column_names: Sequence[str], options: EvalOptions) -> None:
    """Fail before any work when a column the options name is missing, naming the option to change."""
    wanted = {"title_col": options.title_col, "image_col": options.image_col,
              "group_col": options.group_col, "label_col": options.label_col}
    missing = {opt: col for opt, col in wanted.items() if col not in column_names}
    if missing:
        detail = ", ".join(f"{col!r} ({opt.replace('_', '-')})" for opt, col in missing.items())
        raise ValueError(f"catalog has no column {detail}; it has {list(column_names)}. Point the options at "
                         "the right columns (e.g. --group-col dup_group --label-col articleType).")


def read_catalog(uri: str, options: EvalOptions, limit: int | None = None) -> pa.Table:
    """The evaluated columns of a Parquet catalog (file or directory, local or s3://), checked first.

    `limit` keeps a seeded, group-preserving sample of about that many rows (see limit_rows).
    """
    fs, path = get_fs(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"no catalog at {uri}: give a Parquet file or a directory of them")
    dataset = pa_dataset.dataset(path, filesystem=fs, format="parquet")
    check_columns(dataset.schema.names, options)
    columns = list(dict.fromkeys([options.title_col, options.image_col, options.group_col, options.label_col]))
    table = dataset.to_table(columns=columns)
    return table if limit is None else limit_rows(table, limit, options.group_col, options.seed)


def group_split(table: pa.Table, holdout: float, group_col: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): a seeded split of about `holdout` of the rows with every group whole
    on one side, so that no evaluated listing, nor a duplicate of it, is seen in pretraining."""
    codes = _group_codes(table.column(group_col).to_pylist())
    unique, inverse = np.unique(codes, return_inverse=True)
    held = np.random.default_rng([seed, 7]).random(len(unique)) < holdout
    return np.flatnonzero(~held[inverse]), np.flatnonzero(held[inverse])


def limit_rows(table: pa.Table, n: int, group_col: str, seed: int) -> pa.Table:
    """A seeded sample of about `n` rows that keeps every group whole (so duplicates stay findable).

    Groups (a null group is a row alone) are taken in a seeded random order until `n` rows are
    reached; the last group may overshoot by its size - 1. Row order of the catalog is kept.
    """
    if n >= table.num_rows:
        return table
    codes = _group_codes(table.column(group_col).to_pylist())
    unique, inverse = np.unique(codes, return_inverse=True)
    sizes = np.bincount(inverse)
    order = np.random.default_rng(seed).permutation(len(unique))
    taken = order[: int(np.searchsorted(np.cumsum(sizes[order]), n)) + 1]
    return table.take(np.flatnonzero(np.isin(inverse, taken)))


def evaluate(table: pa.Table, embedders: dict[str, Embedder], options: EvalOptions = EvalOptions()) -> EvalResults:
    """Run every measurement of EVALUATION.md for each embedder on one catalog, in one run.

    Queries (re-listings, k-NN sample, probe split) are drawn once from `options.seed` and shared by
    all embedders, so their numbers compare row for row.
    """
    started = time.perf_counter()
    check_columns(table.column_names, options)
    titles = table.column(options.title_col).to_pylist()
    images = table.column(options.image_col).to_pylist()
    groups = table.column(options.group_col).to_pylist()
    labels = table.column(options.label_col).to_pylist()
    relists = {family: make_relistings(table, options.relistings, options.seed, options.relist_config,
                                       families, options.title_col, options.image_col)
               for family, families in RELIST_FAMILIES.items()}
    both = np.array([bool(t) and i is not None for t, i in zip(titles, images)])
    models = [_evaluate_one(name, embed, titles, images, groups, labels, relists, both, options)
              for name, embed in embedders.items()]
    info = {
        "n_rows": table.num_rows,
        "n_labelled": sum(y is not None for y in labels),
        "n_relistings": {family: len(r[2]) for family, r in relists.items()},
        "seed": options.seed,
        "options": {k: v for k, v in asdict(options).items() if k != "thresholds"},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} threads "
                   f"{torch.get_num_threads()}, faiss {faiss.__version__}",
        "wall_s": round(time.perf_counter() - started, 1),
    }
    return EvalResults(models=models, info=info)


def _evaluate_one(name, embed, titles, images, groups, labels, relists, both, options) -> ModelResult:
    """All variants of all metrics for one embedder (see evaluate)."""
    t0 = time.perf_counter()
    catalog = {v: embed(*_variant_inputs(titles, images, v)) for v in VARIANTS}
    queries = {(family, v): embed(*_variant_inputs(r[0], r[1], v)) for family, r in relists.items() for v in VARIANTS}
    t1 = time.perf_counter()
    metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, list[float]] = {}
    backfill: dict[str, list[float]] = {}
    probe = linear_probe(catalog["full"], labels, options.seed, options.probe_test_fraction,
                         max_train=options.probe_max_train, query_embs=catalog)
    for v in VARIANTS:
        m: dict[str, float] = {}
        natural = esp_natural(catalog["full"], groups, query_emb=catalog[v])
        m.update({f"natural_{k}": natural[k] for k in ("recall@1", "recall@10", "map@10")})
        for family, (_, _, originals) in relists.items():
            r = esp_relisting(catalog["full"], queries[(family, v)], originals, groups)
            m.update({f"relist_{family}_recall@1": r["recall@1"], f"relist_{family}_recall@10": r["recall@10"]})
            if v == "full":
                curves[f"relist_{family}"] = r["recall_curve"]
        knn = knn_vote_loo(catalog["full"], labels, options.knn_k, query_emb=catalog[v],
                           max_queries=options.knn_max_queries, seed=options.seed)
        m.update({"knn_accuracy": knn["accuracy"], "knn_macro_f1": knn["macro_f1"],
                  "probe_accuracy": probe["queries"][v]["accuracy"], "probe_macro_f1": probe["queries"][v]["macro_f1"]})
        if v == "full":
            curves["natural"] = natural["recall_curve"]
            backfill = precision_coverage(knn["confidence"], knn["correct"], options.thresholds)
            m.update({"n_natural_queries": natural["n_queries"], "n_knn_queries": knn["n_queries"],
                      "n_probe_train": probe["n_train"], "n_probe_test": probe["n_test"]})
        metrics[v] = m
    dominance = modality_movement(catalog["full"], catalog["title_blank"], catalog["image_blank"], both)
    seconds = {"embed": round(t1 - t0, 1), "metrics": round(time.perf_counter() - t1, 1)}
    return ModelResult(name, metrics, curves, backfill, dominance, seconds)
