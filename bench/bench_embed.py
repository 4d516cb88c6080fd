"""Benchmark: the whole embedding job (run_embed on local Ray) against the bare model forward on the same
already-decoded batches, in one process run with the same torch thread count.

    python -m bench.bench_embed /work/shared/data/fashion-dev.parquet --preset small --rows 5000

(a) bare: decode every row once with the processor, then time the forward over the batches in a plain
    loop (`Encoder.encode`: model.encode under inference mode, --encode-threads torch threads, or cuda +
    bf16 with --num-gpus) -- the ceiling for the job;
(b) job: `run_embed` end to end (read, validate, decode/tokenise tasks, encode actor, write, publish) on
    the same rows and the same model dir, wall clock from the call to the published manifest.
Prints items/s for both, their ratio, and where the job's time went (from its manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import pyarrow.parquet as pq
import ray
import torch

from item_model import ItemModel, ItemProcessor, preset_config, save_model_dir, train_tokenizer
from pipeline.catalog import open_dataset
from pipeline.embed import EmbedOptions, run_embed, summary_line
from pipeline.encode import Encoder


def make_model_dir(titles: list[str], preset: str, directory: str) -> str:
    """A fresh random-init model of `preset` (throughput does not depend on training)."""
    tok = train_tokenizer(titles, vocab_size=8000)
    torch.manual_seed(0)
    model = ItemModel(preset_config(preset, tok))
    processor = ItemProcessor(tok, image_size=model.config.image_size, max_title_len=model.config.max_title_len)
    save_model_dir(model, processor, directory)
    return directory


def bare_forward(model_dir: str, titles: list, images: list, batch_size: int, threads: int, device: str) -> tuple[float, float]:
    """(decode seconds, encode seconds) of the plain loop: decode all rows once, then encode them with the
    job's own `Encoder.encode` (same device, dtype and copies as the job; no Ray)."""
    encoder = Encoder(model_dir, device=device, num_threads=threads)
    processor = ItemProcessor.from_pretrained(model_dir)
    start = time.perf_counter()
    batches = [processor(titles[i:i + batch_size], images[i:i + batch_size]) for i in range(0, len(titles), batch_size)]
    decode_s = time.perf_counter() - start
    encoder.encode(batches[0])  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        encoder.encode(b)  # returns numpy: the device work is finished when it returns
    return decode_s, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("catalog", help="catalog Parquet (file or directory); the first --rows rows are used")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--encode-threads", type=int, default=2, help="torch threads, bare loop and encode actor")
    parser.add_argument("--encode-cpus", type=float, default=1, help="CPUs Ray reserves per encode actor")
    parser.add_argument("--concurrency", type=int, default=1, help="encode actors")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs given to ray.init")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per encode actor")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-embed-")
    table = open_dataset(args.catalog).head(args.rows, columns=["item_id", "title", "image"])
    pq.write_table(table, os.path.join(work, "catalog.parquet"))
    titles, images = table.column("title").to_pylist(), table.column("image").to_pylist()
    model_dir = make_model_dir(titles, args.preset, os.path.join(work, "model"))

    decode_s, encode_s = bare_forward(model_dir, titles, images, args.batch_size, args.encode_threads,
                                      "cuda" if args.num_gpus > 0 else "cpu")
    bare_rate = len(titles) / encode_s

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    options = EmbedOptions(batch_size=args.batch_size, concurrency=args.concurrency, num_gpus=args.num_gpus,
                           encode_cpus=args.encode_cpus, encode_threads=args.encode_threads)
    manifest = run_embed(os.path.join(work, "catalog.parquet"), model_dir, os.path.join(work, "out"), options)
    t = manifest["timings"]
    job_rate = manifest["embedded"] / t["wall_s"]
    # the encode actor's own busy time: the forward inside the job, without start-up and waits
    actor_rate = manifest["embedded"] / t["encode_s"]
    print(summary_line(manifest))
    print(json.dumps({"resources": manifest["resources"], "timings": t}, indent=1))
    print("\n| preset | rows | batch | threads | bare decode items/s | bare encode items/s | job items/s (wall) "
          "| ratio | encode actor busy items/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.preset} | {len(titles)} | {args.batch_size} | {args.encode_threads} | {len(titles) / decode_s:.0f} "
          f"| {bare_rate:.0f} | {job_rate:.0f} | {job_rate / bare_rate:.2f} | {actor_rate:.0f} |")
    print(f"\njob time (s): validate {t['validate_s']:.2f}, pipeline (read+preprocess+encode, overlapped) "
          f"{t['pipeline_s']:.2f} of which busy: preprocess {t['preprocess_s']:.2f}, encode {t['encode_s']:.2f}; "
          f"write {t['write_s']:.2f}; wall {t['wall_s']:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
