"""How well can a cosine threshold find a labelled catalog's duplicate groups, per embedder? The ceiling of
the nightly dedup stage, before any index: every pair of clean rows scored, the pair precision/recall curve
against the group column read off it.

    python bench/dedup_ceiling.py demo-output/catalog --model demo-output/model [--model DIR ...]

For each embedder (TF-IDF, pHash, the untrained MiniLM on titles, each --model as published and with mean
pooling): the pair recall at pair precision >= 0.9 (the demo's target: recall >= 0.7 there), the best F1,
the mean pairwise cosine, and what the 100 / 1,000 highest-scoring pairs are: true pairs, or two products
with byte-identical titles (the sample catalog's image-only twins), or with byte-identical photos (its
title-only twins), or other. Catalogs up to a few thousand rows (all pairs are scored in memory).
"""

from __future__ import annotations

import collections

import click
import numpy as np
import pyarrow.compute as pc

from pipeline.catalog import open_dataset


def pair_curve(vectors: np.ndarray, groups: np.ndarray) -> dict:
    """Recall at precision >= 0.9, best F1 and mean cosine over all pairs; and the pair order."""
    iu = np.triu_indices(len(vectors), 1)
    scores = (vectors @ vectors.T)[iu]
    positive = (groups[:, None] == groups[None, :])[iu]
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(positive[order])
    precision, recall = hits / np.arange(1, len(order) + 1), hits / max(positive.sum(), 1)
    at_90 = recall[precision >= 0.9]
    f1 = (2 * precision * recall / np.maximum(precision + recall, 1e-12)).max()
    return {"recall_at_p90": float(at_90.max()) if len(at_90) else 0.0, "best_f1": float(f1),
            "mean_cos": float(scores.mean()), "top": (iu[0][order], iu[1][order])}


@click.command()
@click.argument("catalog")
@click.option("--model", "models", multiple=True, help="A model dir to score (repeatable).")
@click.option("--group-col", default="group_id", show_default=True)
@click.option("--defect-col", default="defect", show_default=True, help="Rows where it is not null are left out.")
def main(catalog: str, models: tuple[str, ...], group_col: str, defect_col: str) -> None:
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
        embedders[md] = model_embedder(md)
        model, processor = load_model_dir(md)
        model.config.pooling = "mean" if model.config.pooling == "cls" else "cls"
        model.embedding_center.zero_()
        embedders[f"{md} ({model.config.pooling} pooling, no centre)"] = loaded_model_embedder(Encoder.of(model), processor)

    print(f"{len(titles)} clean rows, {sum(n * (n - 1) // 2 for n in collections.Counter(groups).values())} same-group pairs\n")
    print("| embedder | pair recall at precision >= 0.9 | best F1 | mean cos | top 100 pairs | top 1,000 pairs |")
    print("|---|---|---|---|---|---|")
    for name, embed in embedders.items():
        curve = pair_curve(embed(titles, images), groups)
        a, b = curve["top"]

        def kinds(n: int) -> str:
            count = collections.Counter(
                "true" if groups[i] == groups[j] else "same title" if titles[i] == titles[j]
                else "same photo" if images[i] == images[j] else "other" for i, j in zip(a[:n], b[:n]))
            return ", ".join(f"{k} {v}" for k, v in count.most_common())

        print(f"| {name} | {curve['recall_at_p90']:.3f} | {curve['best_f1']:.3f} | {curve['mean_cos']:.3f} | "
              f"{kinds(100)} | {kinds(1000)} |", flush=True)


if __name__ == "__main__":
    main()
