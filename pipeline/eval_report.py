"""The evaluation report: a Markdown table per question, PNG plots and the raw results as JSON."""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display: runs headless on any worker
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

from pipeline.eval_metrics import MAX_K  # noqa: E402
from pipeline.evaluate import RELIST_FAMILIES, VARIANTS, EvalResults  # noqa: E402

# column header -> metric key in ModelResult.metrics["full"]
MAIN_COLUMNS: dict[str, str] = {
    "natural R@1": "natural_recall@1",
    "natural R@10": "natural_recall@10",
    "natural mAP@10": "natural_map@10",
    **{f"relist {f} R@1": f"relist_{f}_recall@1" for f in RELIST_FAMILIES},
    "relist both R@10": "relist_both_recall@10",
    "kNN acc": "knn_accuracy",
    "kNN macro-F1": "knn_macro_f1",
    "probe acc": "probe_accuracy",
    "probe macro-F1": "probe_macro_f1",
}
# metrics repeated for each blanking variant in the modality table and bars
BALANCE_METRICS: dict[str, str] = {
    "natural R@1": "natural_recall@1",
    "relist both R@1": "relist_both_recall@1",
    "kNN acc": "knn_accuracy",
    "probe acc": "probe_accuracy",
}
VARIANT_LABELS = {"full": "full", "title_blank": "no title", "image_blank": "no image"}
PLOTS = ("recall_at_k.png", "backfill_precision_coverage.png", "modality_blanking.png")


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def main_table(results: EvalResults) -> str:
    """Markdown table: one row per model, the full-input metrics as columns, plus embedding time."""
    head = ["model", *MAIN_COLUMNS, "embed s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in results.models:
        cells = [m.name, *(_fmt(m.metrics["full"][key]) for key in MAIN_COLUMNS.values()), f"{m.seconds['embed']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def balance_table(results: EvalResults) -> str:
    """Markdown table: each balance metric as full / no title / no image, then the movement figures."""
    head = ["model", *(f"{name} (full / no title / no image)" for name in BALANCE_METRICS),
            "title movement", "image movement", "image share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in results.models:
        triples = [" / ".join(_fmt(m.metrics[v][key]) for v in VARIANTS) for key in BALANCE_METRICS.values()]
        d = m.dominance
        lines.append("| " + " | ".join([m.name, *triples, _fmt(d["title_movement"]), _fmt(d["image_movement"]),
                                        _fmt(d["image_share"])]) + " |")
    return "\n".join(lines)


def _plot_recall(results: EvalResults, path: str) -> None:
    sets = ["natural", *(f"relist_{f}" for f in RELIST_FAMILIES)]
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.6), sharey=True)
    ks = list(range(1, MAX_K + 1))
    for ax, name in zip(axes, sets):
        for m in results.models:
            ax.plot(ks, m.recall_curves[name], marker="o", markersize=3, label=m.name)
        ax.set(title=name.replace("_", " "), xlabel="k", ylim=(0, 1.02), xticks=ks)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall@k")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_backfill(results: EvalResults, path: str) -> None:
    fig, (ax_p, ax_c) = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    for m in results.models:
        ax_p.plot(m.backfill["threshold"], m.backfill["precision"], label=m.name)
        ax_c.plot(m.backfill["threshold"], m.backfill["coverage"], label=m.name)
    ax_p.set(title="k-NN backfill precision", xlabel="confidence threshold", ylabel="precision", ylim=(0, 1.02))
    ax_c.set(title="k-NN backfill coverage", xlabel="confidence threshold", ylabel="share filled", ylim=(0, 1.02))
    for ax in (ax_p, ax_c):
        ax.grid(alpha=0.3)
    ax_c.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_blanking(results: EvalResults, path: str) -> None:
    names = [m.name for m in results.models]
    panels = len(BALANCE_METRICS) + 1
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.6))
    width = 0.8 / len(VARIANTS)
    for ax, (title, key) in zip(axes, BALANCE_METRICS.items()):
        for j, v in enumerate(VARIANTS):
            values = [m.metrics[v][key] for m in results.models]
            ax.bar([i + (j - 1) * width for i in range(len(names))], values, width, label=VARIANT_LABELS[v])
        ax.set(title=title, ylim=(0, 1.02), xticks=range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    axes[0].legend(fontsize=8)
    ax = axes[-1]  # dominance: how far each blanking moves the embedding
    for j, (label, key) in enumerate((("title blanked", "title_movement"), ("image blanked", "image_movement"))):
        values = [m.dominance[key] for m in results.models]
        ax.bar([i + (j - 0.5) * 0.4 for i in range(len(names))], values, 0.4, label=label)
    ax.set(title="movement: 1 - cos(full, blanked)", xticks=range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: EvalResults, out_dir: str) -> str:
    """Write report.md, results.json and the PLOTS into `out_dir` (created if needed); return report.md's path."""
    os.makedirs(out_dir, exist_ok=True)
    info = results.info
    header = [
        "# Evaluation report",
        "",
        f"- catalog: `{info.get('catalog', 'in memory')}`, {info['n_rows']} rows ({info['n_labelled']} labelled)",
        f"- re-listing queries per family: {info['n_relistings']}; seed {info['seed']}",
        f"- machine: {info['machine']}; wall time {info['wall_s']} s",
    ]
    if "command" in info:
        header.append(f"- command: `{info['command']}`")
    body = [
        "",
        "## Duplicate search and category prediction",
        "",
        "Recall@k = share of queries with a hit in the top k; natural = listings of the same product group, "
        "relist = seeded re-listings per perturbation family (hit = the original or its group). kNN = "
        "leave-one-out cosine-weighted vote; probe = logistic regression on a held-out split. "
        "Definitions: `pipeline/evaluate.py`.",
        "",
        main_table(results),
        "",
        "## Modality balance",
        "",
        "Queries re-embedded with the title blanked or the image blanked; the gallery keeps both. "
        "Movement = 1 - mean cosine(full, blanked) over rows with both modalities; image share = "
        "image movement / (title + image movement): 0.5 is balance, near 0 means the image is ignored.",
        "",
        balance_table(results),
        "",
        "## Plots",
        "",
        *(f"![{name[:-4]}]({name})" for name in PLOTS),
        "",
    ]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(header + body))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results.to_dict(), f, indent=1, default=str)
    _plot_recall(results, os.path.join(out_dir, PLOTS[0]))
    _plot_backfill(results, os.path.join(out_dir, PLOTS[1]))
    _plot_blanking(results, os.path.join(out_dir, PLOTS[2]))
    return path
