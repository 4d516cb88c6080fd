"""The comparison of EVALUATION.md in one command: pretrain every model variant on the same data with the
same budget, then evaluate them side by side with the references on listings none of them saw.

    python bench/compare_models.py ../shared/data/fashion-dev.parquet --out /tmp/compare-r3 \
        --same-weights item_contrastive

Phases (each timed and printed):

  split     the catalog is split by duplicate group (--holdout 0.2, a whole group on one side): the
            pretraining rows go to OUT/train-catalog.parquet in a seeded random order; evaluation runs on
            a group-preserving sample of --limit held-out rows only.
  train     one `pipeline.pretrain.pretrain` run per variant (item_model.config.VARIANTS), all from the same
            start (--init-from minilm, held still for the first --start-frozen-steps while the fresh
            parameters learn), with the same rows, preset, steps, batch size, lr, warm-up and seed;
            Ray is initialised once here (local, 1 Ray Train worker, CPU; one GPU with --gpu). Model dirs land in
            OUT/models/<variant>; a variant whose model dir is already published at the same settings is
            not trained again (re-running the command after a crash resumes where it stopped; other
            settings fail loudly).
  evaluate  `pipeline.evaluate.evaluate` over the held-out sample: every trained model, the same weights
            with the other pooling and without the fitted corpus centre (--same-weights), and the
            references (--references: TF-IDF, pHash, and the untrained start `minilm` on titles alone);
            then `write_report`: OUT/report/report.md, results.json and the PNG plots, plus a "Training"
            section (settings, time, final losses) and a collapse check (mean pairwise cosine) of every
            embedder.

The catalog is read where it lies (never copied into the repository).

Budget (issue 10: at most 20 minutes of pretraining per model on the 2-core CPU, no GPU). Measured on
this machine with this script: the minilm preset trains at ~42 samples/s for item and item_no_global
(one encoder pass per step) and ~23 samples/s for item_contrastive (plus an image-only and a
title-only pass; 19-20 samples/s on the VM of the seventh session), after ~70 s of fixed cost per variant (Ray Train start, first batches, export, corpus
centre). 300 steps x 64 rows = 19,200 samples (two thirds of an epoch of the 28k pretraining rows)
takes ~9 min for item and ~15 min for item_contrastive. Evaluation embeds 3 x limit + 9 x relistings
rows per model at ~170 rows/s: `--limit 4000 --relistings 300` is ~90 s per model.

The defaults below are that budget; on a GPU or a bigger machine raise --steps and --limit. With --gpu
the Ray Train worker trains on one GPU and the trained models embed on it for the evaluation (the
references stay on the CPU), e.g. 10x the image budget:

    python bench/compare_models.py ../shared/data/fashion-dev.parquet --out /tmp/compare-gpu --gpu \
        --steps 3000 --batch-size 64 --variants item_contrastive --same-weights item_contrastive
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from item_model.presets import PRESETS, VARIANTS  # noqa: E402
from pipeline import storage  # noqa: E402

DEFAULTS = dict(preset="minilm", init_from="minilm", variants="item,item_no_global,item_contrastive", steps=300,
                batch_size=64, lr=1e-4, fresh_lr_scale=10.0, holdout=0.2, limit=4000, relistings=300,
                knn_queries=2000, references="tfidf,phash,minilm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("catalog", help="Fashion catalog Parquet (item_id, title, image, articleType, dup_group); read in place.")
    p.add_argument("--out", required=True, help="Run directory: models/, report/ (must not hold a report yet).")
    p.add_argument("--preset", default=DEFAULTS["preset"], choices=sorted(PRESETS), help="Model size preset.")
    p.add_argument("--init-from", default=DEFAULTS["init_from"],
                   help="Pretrained start of every variant (a named start or a BERT dir; 'none': random init).")
    p.add_argument("--fresh-lr-scale", type=float, default=DEFAULTS["fresh_lr_scale"],
                   help="With a start: lr multiplier of the parameters it does not initialise (image stream, heads).")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="Optimizer steps per variant.")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="Rows per step.")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Peak AdamW learning rate (10%% warm-up, cosine).")
    p.add_argument("--variants", default=DEFAULTS["variants"],
                   help=f"Comma-separated variants to train and compare, of {', '.join(VARIANTS)}.")
    p.add_argument("--references", default=DEFAULTS["references"],
                   help="Untrained references evaluated beside them (pipeline.evaluate.BASELINES).")
    p.add_argument("--same-weights", default="item,item_contrastive",
                   help="Variants also evaluated with the other pooling and without their corpus centre.")
    p.add_argument("--holdout", type=float, default=DEFAULTS["holdout"],
                   help="Share of the catalog held out of pretraining, split by duplicate group; evaluation "
                        "runs on the held-out rows only.")
    p.add_argument("--limit", type=int, default=DEFAULTS["limit"],
                   help="Evaluation sample: about this many held-out rows, duplicate groups kept whole (0: all).")
    p.add_argument("--relistings", type=int, default=DEFAULTS["relistings"], help="Re-listing queries per family.")
    p.add_argument("--knn-queries", type=int, default=DEFAULTS["knn_queries"], help="k-NN vote queries.")
    p.add_argument("--train-threads", type=int, default=0,
                   help="Torch threads of the training worker (0: the library's rule, one per reserved CPU).")
    p.add_argument("--start-frozen-steps", type=int, default=None,
                   help="With a start: its parameters stay fixed for this many first steps while the fresh ones "
                        "learn (default: 20%% of --steps; 0: none).")
    p.add_argument("--export-whiten-shrink", default=argparse.SUPPRESS, metavar="EPS|none", type=whiten_shrink,
                   help="The trained models' own partial whitening at export (TrainConfig.whiten_shrink; none: "
                        "centring only, as before run 12w; default: the library's).")
    p.add_argument("--override", action="append", default=[], metavar="FIELD=JSON",
                   help="ItemConfig field set on every variant, e.g. global_mim_weight=2.0 (repeatable).")
    p.add_argument("--group-col", default="dup_group", help="Duplicate-group column of the catalog.")
    p.add_argument("--label-col", default="articleType", help="Leaf category column of the catalog.")
    p.add_argument("--seed", type=int, default=0, help="Seeds model init, masking, the subsets and the queries.")
    p.add_argument("--gpu", action="store_true", help="Pretrain on one GPU and embed the trained models on it.")
    p.add_argument("--whiten", type=int, nargs="*", default=[], metavar="DIMS",
                   help="Also evaluate each --same-weights variant whitened (PCA whitening of its uncentred vectors "
                        "fitted on 2,048 pretraining rows), keeping DIMS principal directions (0: all); repeatable.")
    p.add_argument("--whiten-shrink", type=float, nargs="*", default=[], metavar="EPS",
                   help="Also evaluate each --same-weights variant partly whitened: every principal direction scaled "
                        "by 1/sqrt(variance + EPS x the mean variance) (0: full whitening; large: the centred vector).")
    p.add_argument("--whiten-fit", nargs="+", default=["joint"], choices=["joint", "title", "image"],
                   help="What the --whiten/--whiten-shrink matrices are fitted on: the pretraining rows' joint "
                        "vectors (as the model's own whitening is), or their title-only or photo-only vectors.")
    p.add_argument("--whiten-rows", type=int, nargs="+", default=[2048], metavar="N",
                   help="How many pretraining rows the --whiten/--whiten-shrink matrices are fitted on (the model's "
                        "own whitening: TrainConfig.center_rows, 2,048); several: one row of each.")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.same_weights = [v for v in args.same_weights.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    args.overrides = {}
    for item in args.override:
        name, sep, value = item.partition("=")
        if not sep:
            p.error(f"--override expects FIELD=JSON, got {item!r}")
        args.overrides[name] = json.loads(value)
    return args


def split_catalog(catalog: str, out: str, args: argparse.Namespace):
    """Split the catalog by duplicate group: the pretraining rows go to OUT/train-catalog.parquet (item_id,
    title, image in a seeded random order); the held-out rows come back as the evaluation table (a
    group-preserving sample of about --limit rows)."""
    from pipeline.evaluate import EvalOptions, group_split, limit_rows, read_catalog

    options = EvalOptions(group_col=args.group_col, label_col=args.label_col)
    table = read_catalog(catalog, options)  # checks the evaluated columns first
    ids = pq.read_table(catalog, columns=["item_id"]).column(0)
    train_rows, held_rows = group_split(table, args.holdout, args.group_col, args.seed)
    path = os.path.join(out, "train-catalog.parquet")
    if not os.path.exists(path):
        order = np.random.default_rng(args.seed).permutation(train_rows)
        train = table.take(order).append_column("item_id", ids.take(order))
        # small row groups: Ray Data streams them
        pq.write_table(train.select(["item_id", "title", "image"]), path + ".tmp", row_group_size=2048)
        os.rename(path + ".tmp", path)
    held = table.take(held_rows)
    evaluated = limit_rows(held, args.limit, args.group_col, args.seed) if args.limit else held
    return path, {"train_rows": len(train_rows), "held_out_rows": len(held_rows), "evaluated_rows": evaluated.num_rows}, evaluated


def whiten_shrink(text: str) -> float | None:
    """--export-whiten-shrink EPS|none (argparse reports the ValueError)."""
    from item_model.training import parse_whiten_shrink

    return parse_whiten_shrink(text)


def train_variants(catalog: str, args: argparse.Namespace) -> dict[str, dict]:
    """Pretrain each variant with identical settings; returns variant -> {dir, seconds, manifest}."""
    from item_model.training import TrainConfig
    from pipeline.pretrain import pretrain, work_dir_for

    trained = {}
    for variant in args.variants:
        model_dir = os.path.join(args.out, "models", variant)
        cfg = TrainConfig(
            preset=args.preset, variant=variant, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            init_from=None if args.init_from == "none" else args.init_from, fresh_lr_scale=args.fresh_lr_scale,
            start_frozen_steps=args.start_frozen_steps,
            warmup_steps=args.steps // 10, checkpoint_every=max(1, args.steps // 3), report_every=25,
            num_workers=1, use_gpu=args.gpu, torch_threads=args.train_threads, seed=args.seed,
            model_overrides=dict(args.overrides),
            **({"whiten_shrink": args.export_whiten_shrink} if "export_whiten_shrink" in vars(args) else {}),
        )
        # an interrupted comparison resumes: a published dir at these settings is kept as it is
        resume = os.path.exists(os.path.join(work_dir_for(os.path.abspath(model_dir)), "train_config.json"))
        print(f"\n=== train {variant}: {args.preset}, {args.steps} steps x {args.batch_size}, lr {args.lr}"
              f"{' (resume)' if resume else ''}", flush=True)
        t0 = time.perf_counter()
        pretrain(catalog, model_dir, cfg, resume=resume)
        seconds = time.perf_counter() - t0
        trained[variant] = {"dir": model_dir, "seconds": seconds, "manifest": storage.read_manifest(model_dir)}
        print(f"=== {variant} trained in {seconds:.0f} s", flush=True)
    return trained


def embedding_spread(embed, titles: list, images: list, n: int = 500, seed: int = 0) -> dict[str, float]:
    """Collapse check on a seeded sample: mean pairwise cosine of distinct rows (near 1 = every row
    embeds to the same vector) and the share of variance on the first principal component."""
    idx = np.random.default_rng(seed).choice(len(titles), size=min(n, len(titles)), replace=False)
    e = embed([titles[i] for i in idx], [images[i] for i in idx])
    sims = e @ e.T
    off = sims[~np.eye(len(e), dtype=bool)]
    centred = e - e.mean(0)
    s = np.linalg.svd(centred, compute_uv=False) ** 2
    return {"mean_pairwise_cosine": float(off.mean()), "top_pc_share": float(s[0] / s.sum())}


def training_section(trained: dict[str, dict], args: argparse.Namespace, split: dict) -> str:
    lines = [
        "",
        "## Training (same data, steps, batch, lr and seed for every variant)",
        "",
        f"- split by duplicate group (seed {args.seed}): {split['train_rows']} rows pretrain, "
        f"{split['held_out_rows']} held out, of which {split['evaluated_rows']} evaluated (groups whole)",
        f"- start: {args.init_from}; preset {args.preset}; {args.steps} steps x batch {args.batch_size} "
        f"(= {args.steps * args.batch_size} samples per variant); peak lr {args.lr} (parameters not in the "
        f"start x{args.fresh_lr_scale}), warm-up {args.steps // 10} steps then cosine; seed {args.seed}; "
        f"1 Ray Train worker, CPU, torch threads {args.train_threads or 'library default (the cores there are)'}",
    ]
    frozen = {t["manifest"]["train_config"]["start_frozen_steps"] for t in trained.values()}
    if frozen - {0}:
        lines.append(f"- the start's parameters fixed for the first {', '.join(map(str, sorted(frozen)))} steps (only the fresh ones "
                     "learn), then warmed up again")
    shrinks = {t["manifest"].get("embedding_whitening_shrink") for t in trained.values()}
    lines.append(f"- published vector: centred on the training catalog, whitened in part with shrink "
                 f"{', '.join(map(str, sorted(shrinks - {None})))}" if shrinks - {None} else
                 "- published vector: not whitened (centred, where the model has a centre)")
    if args.overrides:
        lines.append(f"- ItemConfig overrides on every variant: `{json.dumps(args.overrides)}`")
    lines += [
        "",
        "| variant | train s (incl. start-up, export, centring) | samples/s (last report) | final losses |",
        "|---|---|---|---|",
    ]
    for variant, t in trained.items():
        history = t["manifest"]["history"]
        losses = ", ".join(f"{k} {v:.3f}" for k, v in t["manifest"]["final_losses"].items()
                           if k not in ("rows_seen", "rows_skipped", "eta_s"))
        sps = history[-1]["samples_per_s"] if history else float("nan")
        lines.append(f"| {variant} | {t['seconds']:.0f} | {sps:.1f} | {losses} |")
    # the view term's two parts along the run: whether (and when) the photo learns to find its listing
    for variant, t in trained.items():
        history = t["manifest"]["history"]
        if not history or "view_image" not in history[-1]:
            continue
        lines += ["", f"{variant}: the view term's parts by step (means over each report's window)", "",
                  "| step | " + " | ".join(str(r["step"]) for r in history) + " |",
                  "|---|" + "---|" * len(history)]
        lines += [f"| {k} | " + " | ".join(f"{r[k]:.2f}" for r in history) + " |" for k in ("view_image", "view_title")]
    return "\n".join(lines) + "\n"


def spread_section(spread: dict[str, dict]) -> str:
    lines = ["", "## Collapse check (every embedder)", "",
             "Mean pairwise cosine of 500 sampled evaluated rows' embeddings (near 1 = every row embeds to "
             "one direction) and the variance share of the first principal component.", "",
             "| embedder | mean pairwise cos | top PC share |", "|---|---|---|"]
    lines += [f"| {name} | {sp['mean_pairwise_cosine']:.3f} | {sp['top_pc_share']:.3f} |" for name, sp in spread.items()]
    return "\n".join(lines) + "\n"


def same_weight_embedders(trained: dict[str, dict], variants: list[str], device: str = "cpu") -> dict:
    """Inference-time choices measured on the same weights, for each of `variants` that was trained: the
    other pooling ([CLS] vs mean), and the vectors without the fitted corpus centre."""
    from item_model import load_model_dir
    from pipeline.encode import Encoder
    from pipeline.eval_embedders import loaded_model_embedder

    out = {}
    for variant in [v for v in variants if v in trained]:
        model, processor = load_model_dir(trained[variant]["dir"])
        if not hasattr(model, "embedding_center"):  # the two-stream baseline has neither choice
            continue
        other = "mean" if model.config.pooling == "cls" else "cls"
        model.config.pooling = other
        out[f"{variant} ({other} pooling)"] = loaded_model_embedder(Encoder.of(model, device), processor)
        model, processor = load_model_dir(trained[variant]["dir"])
        model.reset_embedding_space()
        out[f"{variant} (no centring, no whitening)"] = loaded_model_embedder(Encoder.of(model, device), processor)
    return out


def whitened_embedders(trained: dict[str, dict], variants: list[str], dims: list[int], train_catalog: str,
                       device: str = "cpu", fit_rows: list[int] = (2048,), shrinks: list[float] = (),
                       fits: list[str] = ("joint",)) -> dict:
    """Other embedding spaces over the same weights, fitted on the raw (uncentred) vectors of the first
    rows of the pretraining catalog (each of `fit_rows`): each of `shrinks` (eps) is the model's own
    partial whitening (ItemModel.set_embedding_space) at that eps; each of `dims` a truncated PCA whitening
    (BERT-whitening, Su et al. 2021), (v - mean) @ U_k diag(1/sqrt(s_k)), L2-normalised, keeping the k
    leading directions (0: all). Each of `fits` says which vectors of those rows the fit uses: "joint" (title and photo, as the
    model's own whitening), "title" (photo left out) or "image" (title blanked)."""
    import copy

    import torch

    from item_model import load_model_dir
    from pipeline.encode import Encoder
    from pipeline.eval_embedders import loaded_model_embedder

    fit = pq.read_table(train_catalog, columns=["title", "image"]).slice(0, max(fit_rows))
    titles, images = fit.column("title").to_pylist(), fit.column("image").to_pylist()
    inputs = {"joint": (titles, images), "title": (titles, [None] * len(titles)), "image": ([""] * len(titles), images)}
    out = {}
    for variant in [v for v in variants if v in trained and (dims or shrinks)]:
        model, processor = load_model_dir(trained[variant]["dir"])
        model.reset_embedding_space()
        raw = loaded_model_embedder(Encoder.of(model, device), processor)
        for which in fits:
            every = raw(*inputs[which])
            for rows in fit_rows:
                e = every[:rows]
                fitted = (f"{'' if which == 'joint' else f', fit on {which}-only'}"
                          f"{'' if list(fit_rows) == [2048] else f', {len(e)} rows'}")
                for eps in shrinks:
                    shrunk = copy.deepcopy(model)
                    shrunk.set_embedding_space(torch.from_numpy(e), eps)
                    out[f"{variant} (whitened, shrink {eps:g}{fitted})"] = loaded_model_embedder(
                        Encoder.of(shrunk, device), processor)
                if not dims:
                    continue
                e = e.astype(np.float64)
                mean = e.mean(0)
                values, vectors = np.linalg.eigh(np.cov((e - mean).T))
                values, vectors = values[::-1], vectors[:, ::-1]
                for k in [k or len(values) for k in dims]:

                    def embed(titles, images, mean=mean, w=vectors[:, :k] / np.sqrt(np.maximum(values[:k], 1e-6 * values[0]))):
                        x = (raw(titles, images) - mean) @ w
                        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

                    out[f"{variant} (whitened, {k} dims{fitted})"] = embed
    return out


def check_device(gpu: bool) -> str:
    """The torch device the trained models use: "cuda" with --gpu, failing before any work when torch sees
    no CUDA device."""
    import torch

    if gpu and not torch.cuda.is_available():
        raise SystemExit(f"--gpu: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False); "
                         "run without --gpu, or on a GPU machine with a CUDA build of torch")
    return "cuda" if gpu else "cpu"


def budget_note() -> str:
    """The "Budget" paragraph of this module's docstring: why these steps and this sample size."""
    start = __doc__.index("Budget (")
    return __doc__[start : __doc__.index("The defaults below", start)].strip()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = check_device(args.gpu)
    command = shlex.join(["python", "bench/compare_models.py", *(argv if argv is not None else sys.argv[1:])])
    report_dir = os.path.join(args.out, "report")
    if os.path.exists(report_dir):
        raise SystemExit(f"{report_dir} already exists: choose a new --out (reports are never overwritten)")
    os.makedirs(args.out, exist_ok=True)
    phases: dict[str, float] = {}
    t_all = time.perf_counter()

    import ray
    import torch

    from pipeline.eval_report import balance_table, main_table, write_report
    from pipeline.eval_embedders import baseline_embedders, model_embedder
    from pipeline.evaluate import EvalOptions, evaluate

    t0 = time.perf_counter()
    catalog, split, table = split_catalog(args.catalog, args.out, args)
    phases["split"] = time.perf_counter() - t0
    print(f"split by {args.group_col}: {split}", flush=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    try:
        trained = train_variants(catalog, args)
    finally:
        ray.shutdown()
    phases["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    options = EvalOptions(group_col=args.group_col, label_col=args.label_col, relistings=args.relistings,
                          seed=args.seed, knn_max_queries=args.knn_queries)
    titles = table.column(options.title_col).to_pylist()
    images = table.column(options.image_col).to_pylist()
    embedders = {v: model_embedder(t["dir"], batch_size=64, device=device) for v, t in trained.items()}
    embedders.update(same_weight_embedders(trained, args.same_weights, device))
    embedders.update(whitened_embedders(trained, args.same_weights, args.whiten, catalog, device,
                                        fit_rows=args.whiten_rows, shrinks=args.whiten_shrink, fits=args.whiten_fit))
    embedders.update(baseline_embedders([r for r in args.references.split(",") if r], titles))
    results = evaluate(table, embedders, options)
    phases["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    spread = {name: embedding_spread(embed, titles, images, seed=args.seed) for name, embed in embedders.items()}
    phases["collapse check"] = time.perf_counter() - t0

    results.info.update(catalog=args.catalog, command=command)
    staging = f"{report_dir}.tmp-{os.getpid()}"
    path = write_report(results, staging)
    machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, torch threads in evaluation {torch.get_num_threads()}, " + (
        f"trained and embedded on {torch.cuda.get_device_name(0)}" if args.gpu
        else "no GPU" if not torch.cuda.is_available() else "GPU present (unused: no --gpu)")
    phases["total"] = time.perf_counter() - t_all
    with open(path, "a") as f:
        f.write(training_section(trained, args, split))
        f.write(spread_section(spread))
        f.write("\n## Budget (bench/compare_models.py)\n\n" + budget_note() + "\n")
        f.write("\n## Wall time per phase\n\n" + "\n".join(f"- {k}: {v / 60:.1f} min" for k, v in phases.items())
                + f"\n- machine: {machine}\n")
    with open(os.path.join(staging, "run.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "phases_s": phases, "spread": spread, "split": split,
                   "train_seconds": {v: t["seconds"] for v, t in trained.items()},
                   "train_config": next(iter(trained.values()))["manifest"]["train_config"]}, f, indent=1, default=str)
    os.rename(staging, report_dir)

    print("\n" + main_table(results) + "\n\n" + balance_table(results))
    print(training_section(trained, args, split))
    print(spread_section(spread))
    print(f"machine: {machine}")
    for k, v in phases.items():
        print(f"wall time {k}: {v:.0f} s ({v / 60:.1f} min)")
    print(f"report: {os.path.join(report_dir, 'report.md')}")


if __name__ == "__main__":
    main()
