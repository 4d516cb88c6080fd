"""The product on its embedded default: sample catalog -> brief pretraining -> the nightly job.

    python -m jobs.demo --out demo-output        (what `make demo` runs)

1. generates the sample marketplace catalog (`item-pipeline make-sample-catalog`),
2. pretrains ITEm on it briefly on Ray Train, starting from the pretrained text encoder all-MiniLM-L6-v2
   (`item-pipeline pretrain --init-from minilm --variant item_contrastive`, the recipe that measured
   best on real listings: docs/evaluation.md),
3. runs the nightly job for today over it with jobs/nightly.yaml (`item-pipeline nightly`): the dedup
   threshold is calibrated on the catalog's labelled groups, and the report prints how the duplicate
   clusters match them and how accurate the category backfill is on held-back labels.

Each step is skipped when its output already exists, so a second run reuses them (and the nightly job
says the date is done). A few minutes on a 2-core CPU machine.
"""

from __future__ import annotations

import datetime as dt
import os

import click

from jobs import runtime

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nightly.yaml")
DEMO_VARIANT = "item_contrastive"
DEMO_STEPS = 60


@click.command()
@click.option("--out", default="demo-output", show_default=True, help="Directory for the catalog, model and runs.")
@click.option("--items", type=click.IntRange(min=50), default=2000, show_default=True, help="Sample catalog rows.")
@click.option("--steps", type=click.IntRange(min=2), default=DEMO_STEPS, show_default=True, help="Pretraining steps.")
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True, help="Pretraining batch size.")
@click.option("--variant", default=DEMO_VARIANT, show_default=True, help="Model variant to pretrain.")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, help="Nightly config to run.")
@click.option("--preset", default="minilm", show_default=True,
              help="Model size; anything but minilm starts from random weights (tests use tiny).")
@click.option("--verbose", is_flag=True, help="Print the engine's logs too (Ray, Ray Data, Ray Train).")
def main(out: str, items: int, steps: int, batch_size: int, variant: str, config_path: str, preset: str,
         verbose: bool) -> None:
    """Run the whole product on a generated catalog and print the nightly report.

    Example:

        python -m jobs.demo --out demo-output --items 2000 --steps 60
    """
    runtime.configure_output(verbose)  # before Ray is imported
    import ray

    from item_model.training import TrainConfig
    from jobs.config import load_config
    from jobs.nightly import report_markdown, run_nightly
    from pipeline import storage
    from pipeline.pretrain import pretrain
    from pipeline.sample_catalog import summarize_catalog, write_sample_catalog

    catalog, model_dir, runs = (os.path.join(out, name) for name in ("catalog", "model", "runs"))
    config = load_config(config_path, catalog=catalog, model_dir=model_dir, output_root=runs)  # fail fast
    log_dir = runtime.init_ray(verbose)  # local, or the cluster named by RAY_ADDRESS

    if not os.path.exists(catalog):
        click.echo(f"[1/3] sample catalog: {items} listings -> {catalog}")
        click.echo(summarize_catalog(write_sample_catalog(catalog, items, seed=0, rows_per_file=500)))
    else:
        click.echo(f"[1/3] sample catalog: reusing {catalog}")

    if not storage.is_published(model_dir):
        start = "minilm" if preset == "minilm" else None
        click.echo(f"[2/3] pretraining {variant} ({preset}) from {start or 'random weights'} for {steps} steps "
                   f"-> {model_dir}")
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # one worker: it reserves all cores but one (left to Ray Data's decoding) and computes on all of them
        cfg = TrainConfig(preset=preset, init_from=start, variant=variant, steps=steps, batch_size=batch_size,
                          lr=1e-4, fresh_lr_scale=10.0, warmup_steps=max(1, steps // 10),
                          checkpoint_every=steps, num_workers=1, cpus_per_worker=max(1, cpus - 1))
        pretrain(catalog, model_dir, cfg, overwrite=True)
    else:
        click.echo(f"[2/3] model: reusing {model_dir}")

    day = dt.datetime.now(dt.timezone.utc).date()
    click.echo(f"[3/3] nightly job for {day} -> {runs}")
    report = run_nightly(config, day)
    if report.get("already_complete"):
        click.echo(f"(run {day} was already complete; its report follows)")
    click.echo(report_markdown(report))
    click.echo(f"outputs: {report['run_dir']}/{{embeddings,index,dedup,backfill}}, report: {report['run_dir']}/report.md")
    if log_dir:
        click.echo(f"engine logs (Ray, Ray Data, Ray Train): {log_dir}")


if __name__ == "__main__":
    main()
