"""Benchmark: encoding in bf16 against fp32 on this machine's device: speed, and what it does to the vectors.

    python bench/bench_precision.py ../shared/data/fashion-dev.parquet --model-dir demo-output/model --rows 2048

The first --rows listings (title and photo) are prepared once, then encoded by the job's own
`Encoder.encode` in both precisions, alternating for --rounds rounds (the best of each is reported: this
machine is shared). The vectors are compared row by row (cosine of a row's bf16 vector to its fp32 one), as
neighbours (the share of each row's fp32 top-10 that its bf16 top-10 keeps, among the --rows rows), as
pairwise cosines (the largest change), and against themselves (bf16 rounding depends on the batch a row is
in: the same rows re-encoded in a shuffled order).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from item_model import ItemProcessor
from pipeline.catalog import open_dataset
from pipeline.encode import Encoder
from pipeline.storage import local_dir


def encode_all(encoder: Encoder, batches: list[dict]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    out = np.concatenate([encoder.encode(b) for b in batches])
    return out, time.perf_counter() - start


def top_k(vectors: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1)[:, :k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("catalog", help="catalog Parquet (file or directory) with title and image")
    parser.add_argument("--model-dir", required=True, help="a published model dir (e.g. demo-output/model)")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256, help="rows per encode call (the job's default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    table = open_dataset(args.catalog).head(args.rows, columns=["title", "image"])
    titles, images = table.column("title").to_pylist(), table.column("image").to_pylist()
    processor = ItemProcessor.from_pretrained(local_dir(args.model_dir))
    size = args.batch_size
    batches = [processor(titles[i:i + size], images[i:i + size]) for i in range(0, len(titles), size)]
    encoders = {p: Encoder(args.model_dir, args.device, num_threads=args.threads, precision=p) for p in ("fp32", "bf16")}
    for encoder in encoders.values():
        encoder.encode(batches[0])  # warm-up
    seconds: dict[str, list[float]] = {p: [] for p in encoders}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for precision, encoder in encoders.items():
            vectors[precision], s = encode_all(encoder, batches)
            seconds[precision].append(s)

    # the same rows in another order: other batch-mates, other padding
    order = np.random.default_rng(0).permutation(len(titles))
    shuffled = [processor([titles[j] for j in order[i:i + size]], [images[j] for j in order[i:i + size]])
                for i in range(0, len(titles), size)]
    again = np.empty_like(vectors["bf16"])
    again[order] = encode_all(encoders["bf16"], shuffled)[0]

    a, b = vectors["fp32"], vectors["bf16"]
    row_cos = (a * b).sum(axis=1)
    k = 10
    kept = np.mean([len(set(x) & set(y)) / k for x, y in zip(top_k(a, k), top_k(b, k))])
    pairwise = np.abs(a @ a.T - b @ b.T).max()
    self_cos = (again * b).sum(axis=1)
    rate = {p: len(titles) / min(s) for p, s in seconds.items()}
    load = os.getloadavg()[0]
    print(f"\n{len(titles)} rows, batch {size}, {args.threads} torch threads, device {args.device} "
          f"({torch.__version__}), load average {load:.1f} at the end\n")
    print("| precision | rows/s (best of rounds) | per round s | speed-up vs fp32 |\n|---|---|---|---|")
    for p in encoders:
        print(f"| {p} | {rate[p]:.1f} | {', '.join(f'{s:.1f}' for s in seconds[p])} | {rate[p] / rate['fp32']:.2f}x |")
    print("\n| bf16 against fp32 | value |\n|---|---|")
    print(f"| cosine of a row's bf16 vector to its fp32 one: min / 1st percentile / mean | "
          f"{row_cos.min():.5f} / {np.percentile(row_cos, 1):.5f} / {row_cos.mean():.6f} |")
    print(f"| share of each row's fp32 top-{k} kept in its bf16 top-{k} (among the {len(titles)} rows) | {kept:.4f} |")
    print(f"| largest change of a pairwise cosine | {pairwise:.4f} |")
    print(f"| bf16, the same row in another batch: min / mean cosine | {self_cos.min():.5f} / {self_cos.mean():.6f} |")


if __name__ == "__main__":
    main()
