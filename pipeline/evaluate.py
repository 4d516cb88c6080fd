"""Evaluation: duplicate search, category prediction and modality balance of any embedder, side by side.

The measurements of EVALUATION.md, computed from embeddings with exact FAISS inner-product search
(no Ray). An *embedder* is anything that maps (titles, image bytes) to L2-normalised float32 vectors:
an ITEm model dir (`eval_embedders.model_embedder`), or a non-learned reference (TF-IDF, pHash).
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

import os
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import faiss
import numpy as np
import pyarrow as pa
import torch

from pipeline.catalog import open_dataset
from pipeline.eval_embedders import Embedder
from pipeline.eval_metrics import esp_natural, esp_relisting, group_codes, knn_vote_loo, linear_probe
from pipeline.eval_metrics import modality_movement, precision_coverage
from pipeline.perturb import RelistConfig, relist

# re-listing query sets, each a `families=` argument of perturb.relist
RELIST_FAMILIES: dict[str, tuple[str, ...]] = {"image": ("image",), "title": ("title",), "both": ("image", "title")}
VARIANTS = ("full", "title_blank", "image_blank")
Blank = Literal["title", "image"]


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
    dataset = open_dataset(uri)  # the one catalog reader: a file, a directory or an s3:// prefix
    check_columns(dataset.schema.names, options)
    columns = list(dict.fromkeys([options.title_col, options.image_col, options.group_col, options.label_col]))
    table = dataset.to_table(columns=columns)
    return table if limit is None else limit_rows(table, limit, options.group_col, options.seed)


def group_split(table: pa.Table, holdout: float, group_col: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): a seeded split of about `holdout` of the rows with every group whole
    on one side, so that no evaluated listing, nor a duplicate of it, is seen in pretraining."""
    codes = group_codes(table.column(group_col).to_pylist())
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
    codes = group_codes(table.column(group_col).to_pylist())
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
