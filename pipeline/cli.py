"""The `item-pipeline` command line: thin click commands over the pipeline library."""

from __future__ import annotations

import os
import shlex
import sys

import click

from pipeline.sample_catalog import summarize_catalog, write_sample_catalog


@click.group()
@click.version_option(package_name="item-pipeline")
def main() -> None:
    """Offline product-embedding pipeline: ITEm embeddings, FAISS dedup, category backfill."""


@main.command(name="make-sample-catalog")
@click.argument("out", type=click.Path(dir_okay=True, file_okay=True, writable=True))
@click.option("--items", "n_items", type=click.IntRange(min=0), default=2000, show_default=True,
              help="Number of catalog rows (listings) to generate.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed; the same seed and --items give a byte-identical catalog.")
@click.option("--rows-per-file", type=click.IntRange(min=1), default=None,
              help="Write OUT as a directory of part files with at most this many rows each "
                   "(default: one Parquet file at OUT).")
def make_sample_catalog(out: str, n_items: int, seed: int, rows_per_file: int | None) -> None:
    """Generate a sample marketplace catalog as Parquet at OUT (which must not exist).

    Drawn product photos and titles in 12 categories, re-listings by several sellers, hard
    duplicate cases, ~10% rows without a category, and a few deliberately broken rows
    (column `defect`).

    Example:

        item-pipeline make-sample-catalog sample.parquet --items 2000 --seed 0
    """
    try:
        table = write_sample_catalog(out, n_items, seed, rows_per_file=rows_per_file)
    except (FileExistsError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {out}")
    click.echo(summarize_catalog(table))


@main.command(name="evaluate")
@click.argument("catalog")
@click.argument("out_dir", type=click.Path(file_okay=False, writable=True))
@click.option("--models", "models", multiple=True, metavar="NAME=MODEL_DIR",
              help="A model dir to evaluate under a name; repeat for each model.")
@click.option("--baselines", default="tfidf,phash", show_default=True,
              help="Comma-separated non-learned references to include (tfidf, phash); '' for none.")
@click.option("--relistings", type=click.IntRange(min=0), default=500, show_default=True,
              help="Re-listing queries per perturbation family (image, title, both).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the re-listings, the --limit sample, the k-NN query sample and the probe split.")
@click.option("--group-col", default="group_id", show_default=True,
              help="Column of ground-truth product groups (null = a listing alone); fashion data: dup_group.")
@click.option("--label-col", default="true_category", show_default=True,
              help="Column of the category to predict (null = unlabelled); fashion data: articleType.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate a seeded sample of about this many rows, keeping product groups whole.")
@click.option("--knn-queries", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Labelled rows sampled as k-NN vote queries (the gallery is every labelled row).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Rows per model encode call.")
def evaluate_command(catalog: str, out_dir: str, models: tuple[str, ...], baselines: str, relistings: int,
                     seed: int, group_col: str, label_col: str, limit: int | None, knn_queries: int,
                     batch_size: int) -> None:
    """Compare models and baselines on CATALOG; write report.md, results.json and plots to OUT_DIR.

    OUT_DIR must not exist; it appears only once the report is complete.

    Example (the fashion dev set, two models against the TF-IDF and pHash references):

    \b
        item-pipeline evaluate ../shared/data/fashion-dev.parquet eval-report \\
            --models item=runs/item --models vilt=runs/vilt \\
            --group-col dup_group --label-col articleType
    """
    from pipeline.eval_report import main_table, write_report  # matplotlib only for this command
    from pipeline.evaluate import EvalOptions, baseline_embedders, evaluate, model_embedder, read_catalog

    if os.path.exists(out_dir):
        raise click.ClickException(f"{out_dir} already exists; choose a new OUT_DIR (nothing is overwritten)")
    options = EvalOptions(group_col=group_col, label_col=label_col, relistings=relistings, seed=seed,
                          knn_max_queries=knn_queries)
    try:
        named = dict(_name_value(m) for m in models)
        table = read_catalog(catalog, options, limit)
        embedders = {name: model_embedder(path, batch_size) for name, path in named.items()}
        embedders.update(baseline_embedders([b for b in baselines.split(",") if b],
                                            table.column(options.title_col).to_pylist()))
        if not embedders:
            raise ValueError("nothing to evaluate: give --models NAME=MODEL_DIR and/or --baselines")
        results = evaluate(table, embedders, options)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    results.info.update(catalog=catalog, command=shlex.join(["item-pipeline", *sys.argv[1:]]))
    staging = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    write_report(results, staging)
    os.rename(staging, out_dir)
    click.echo(main_table(results))
    click.echo(f"report: {os.path.join(out_dir, 'report.md')} (wall time {results.info['wall_s']} s)")


def _name_value(text: str) -> tuple[str, str]:
    """'NAME=MODEL_DIR' -> (NAME, MODEL_DIR), with a usage hint when malformed."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"--models expects NAME=MODEL_DIR, got {text!r}")
    return name, value


if __name__ == "__main__":
    main()
