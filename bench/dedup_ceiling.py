"""How well can a cosine threshold find a labelled catalog's duplicate groups, per embedder? The ceiling of
the nightly dedup stage, before any index: every pair of clean rows scored, the pair precision/recall curve
against the group column read off it.

    python bench/dedup_ceiling.py demo-output/catalog --model demo-output/model [--model DIR ...]

For each embedder (TF-IDF, pHash, the untrained MiniLM on titles, each --model as published, with the
other pooling, and fed the photo alone or the title alone): the pair recall at pair precision >= 0.9 (the
demo's target: recall >= 0.7 there), the best F1, the mean pairwise cosine, and what the 100 / 1,000
highest-scoring pairs are: true pairs, or two products with byte-identical titles (the sample catalog's
image-only twins), or with byte-identical photos (its title-only twins), or other. A second table gives the
median cosine of each kind of pair: a threshold can only work where true pairs score above the twins.
A third table, per --model: how far each single re-listing perturbation of pipeline/perturb.py moves the
photo-alone vector of a group's first listing (median cosine to it), beside the photo-alone cosine of
same-title twins: which change of the photo the model is not yet invariant to.
Catalogs up to a few thousand rows (all pairs are scored in memory).
"""

from __future__ import annotations

import collections

import click
import numpy as np
import pyarrow.compute as pc

from pipeline.catalog import open_dataset
from pipeline.perturb import IMAGE_PERTURBATIONS, RelistConfig, relist_image


def pair_curve(vectors: np.ndarray, groups: np.ndarray) -> dict:
    """Recall at precision >= 0.9, best F1 and mean cosine over all pairs; the pair order and scores."""
    iu = np.triu_indices(len(vectors), 1)
    scores = (vectors @ vectors.T)[iu]
    positive = (groups[:, None] == groups[None, :])[iu]
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(positive[order])
    precision, recall = hits / np.arange(1, len(order) + 1), hits / max(positive.sum(), 1)
    at_90 = recall[precision >= 0.9]
    f1 = (2 * precision * recall / np.maximum(precision + recall, 1e-12)).max()
    return {"recall_at_p90": float(at_90.max()) if len(at_90) else 0.0, "best_f1": float(f1),
            "mean_cos": float(scores.mean()), "top": (iu[0][order], iu[1][order]), "scores": scores}


@click.command()
@click.argument("catalog")
@click.option("--model", "models", multiple=True, help="A model dir to score (repeatable).")
@click.option("--group-col", default="group_id", show_default=True)
@click.option("--defect-col", default="defect", show_default=True, help="Rows where it is not null are left out.")
@click.option("--perturbed-rows", default=400, show_default=True, help="First listings re-photographed per perturbation.")
def main(catalog: str, models: tuple[str, ...], group_col: str, defect_col: str, perturbed_rows: int) -> None:
    from item_model import load_model_dir
    from pipeline.encode import Encoder
    from pipeline.eval_embedders import baseline_embedders, loaded_model_embedder, model_embedder

    table = open_dataset(catalog).to_table()
    if defect_col in table.column_names:
        table = table.filter(pc.is_null(table.column(defect_col)))
    titles, images = table.column("title").to_pylist(), table.column("image").to_pylist()
    groups = np.asarray(table.column(group_col).cast("string").to_pylist(), dtype=object)
    embedders = baseline_embedders(["tfidf", "phash", "minilm"], titles)
    for md in models:
        embedders[md] = embed = model_embedder(md)
        embedders[f"{md} (photo alone)"] = lambda t, i, embed=embed: embed([""] * len(t), i)
        embedders[f"{md} (title alone)"] = lambda t, i, embed=embed: embed(t, [None] * len(i))
        model, processor = load_model_dir(md)
        model.config.pooling = "mean" if model.config.pooling == "cls" else "cls"
        model.reset_embedding_space()
        embedders[f"{md} ({model.config.pooling} pooling, no centre)"] = loaded_model_embedder(Encoder.of(model), processor)

    print(f"{len(titles)} clean rows, {sum(n * (n - 1) // 2 for n in collections.Counter(groups).values())} same-group pairs\n")
    iu = np.triu_indices(len(titles), 1)
    kind = np.full(len(iu[0]), "other", dtype=object)
    kind[[images[i] == images[j] for i, j in zip(*iu)]] = "same photo"
    kind[[titles[i] == titles[j] for i, j in zip(*iu)]] = "same title"
    kind[groups[iu[0]] == groups[iu[1]]] = "true"
    print("| embedder | pair recall at precision >= 0.9 | best F1 | mean cos | top 100 pairs | top 1,000 pairs |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for name, embed in embedders.items():
        curve = pair_curve(embed(titles, images), groups)
        a, b, n = curve["top"][0][:1000], curve["top"][1][:1000], len(titles)
        top = a * n - a * (a + 1) // 2 + (b - a - 1)  # the pairs' positions in triu order

        def kinds(n: int) -> str:
            return ", ".join(f"{k} {v}" for k, v in collections.Counter(kind[top[:n]]).most_common())

        medians[name] = {k: float(np.median(curve["scores"][kind == k])) for k in ("true", "same title", "same photo", "other")}
        print(f"| {name} | {curve['recall_at_p90']:.3f} | {curve['best_f1']:.3f} | {curve['mean_cos']:.3f} | "
              f"{kinds(100)} | {kinds(1000)} |", flush=True)
    print(f"\nmedian cosine per kind of pair ({collections.Counter(kind).most_common()}):\n")
    print("| embedder | true pairs | same title, other product | same photo, other product | other |")
    print("|---|---|---|---|---|")
    for name, m in medians.items():
        print(f"| {name} | {m['true']:.3f} | {m['same title']:.3f} | {m['same photo']:.3f} | {m['other']:.3f} |")
    if models:
        print_perturbation_table(models, embedders, titles, images, groups, perturbed_rows)


def print_perturbation_table(models, embedders, titles, images, groups, rows: int) -> None:
    """Median cosine of each model's photo-alone vector of a group's first listing to the same photo after
    one perturbation family (RelistConfig's defaults, always applied), and between same-title twins."""
    first = {}
    for i, g in enumerate(groups):
        if images[i] is not None:
            first.setdefault(g, i)
    originals = list(first.values())[:rows]
    by_title = collections.defaultdict(list)
    for i in first.values():
        by_title[titles[i]].append(i)
    twins = [(a[0], a[1]) for a in by_title.values() if len(a) >= 2]
    perturbed = {}
    for family in [*IMAGE_PERTURBATIONS, "all"]:
        rng = np.random.default_rng(0)
        perturbed[family] = [relist_image(images[i], rng, RelistConfig(), None if family == "all" else [family])
                             for i in originals]
    print(f"\nphoto alone: median cosine to the first listing's photo after one perturbation ({len(originals)} "
          f"photos), and between same-title twins ({len(twins)} pairs):\n")
    print("| model | " + " | ".join(perturbed) + " | same-title twins |")
    print("|---|" + "---|" * (len(perturbed) + 1))
    for md in models:
        embed = embedders[f"{md} (photo alone)"]
        base = embed([""] * len(originals), [images[i] for i in originals])
        cells = [np.median((embed([""] * len(p), p) * base).sum(1)) for p in perturbed.values()]
        a = embed([""] * len(twins), [images[i] for i, _ in twins])
        b = embed([""] * len(twins), [images[j] for _, j in twins])
        cells.append(np.median((a * b).sum(1)) if twins else float("nan"))
        print(f"| {md} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
