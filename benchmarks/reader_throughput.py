"""ShardLoader throughput (records/s) in one process on the bundled ml-latest-small sample.

    OMP_NUM_THREADS=1 python benchmarks/reader_throughput.py [--shards DIR] [--epochs 3] [--batch-size 256]

Rows: raw records (no collate), then with a tokenizing collate: modeling's ``make_collate`` (ids and
text prompts) when it imports, else a stand-in that pads item ids into tensors. ``num_workers=0``
is the honest single-core figure; ``num_workers=1`` shows the DataLoader path. The last column compares
with the training consumption rate of the tiny test model (~0.8 s per 256-record step on one core).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from data_shards.build import build_shards
from data_shards.manifest import load_manifest, read_items
from data_shards.reader import ShardLoader

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "ml-latest-small.zip"
TRAIN_RECORDS_PER_S = 256 / 0.8  # tiny 2-layer GPT, batch 256 x 50 tokens, one core


def standin_collate(records: list[dict]) -> dict[str, torch.Tensor]:
    """Pads item ids into input/label tensors, as a tokenizing collate would (no tokenizer)."""
    width = max(len(r["items"]) for r in records)
    ids = torch.full((len(records), width), -100, dtype=torch.long)
    for row, r in enumerate(records):
        ids[row, : len(r["items"])] = torch.tensor(r["items"])
    return {"input_ids": ids[:, :-1].clamp(min=0), "attention_mask": ids[:, :-1] >= 0, "labels": ids[:, 1:]}


def modeling_collates(shards: str) -> dict[str, object]:
    """modeling's collate for the ids and text prompts, or {} when modeling is not usable yet."""
    try:
        from configs import load_config
        from modeling.collate import make_collate
        from modeling.factory import build_model_and_tokenizer
    except ImportError:
        return {}
    out = {}
    items = read_items(shards)
    for prompt in ("ids", "text"):
        try:
            cfg = load_config(None, [f"data.shards={shards}", f"model.prompt={prompt}"])
            _, tokenizer = build_model_and_tokenizer(cfg, shards)
            out[f"modeling make_collate ({prompt})"] = make_collate(cfg, tokenizer, items, "train")
        except Exception as e:  # modeling is developed in parallel: report, keep measuring the rest
            print(f"# modeling collate ({prompt}) unavailable: {type(e).__name__}: {e}")
    return out


def measure(shards: str, collate, workers: int, epochs: int, batch_size: int) -> tuple[float, float]:
    """(records per wall second, records per CPU second of this process)."""
    loader = ShardLoader(
        shards, "train", batch_size=batch_size, num_workers=workers, collate_fn=collate, seed=0
    )
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for batch in loader:
            n += len(batch["input_ids"]) if isinstance(batch, dict) else len(batch)
    return n / (time.perf_counter() - start), n / max(time.process_time() - cpu, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shards", help="shard directory (default: build the bundled sample into a temp dir)"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards = args.shards
    if shards is None:
        shards = str(Path(tempfile.mkdtemp()) / "ml-latest-small")
        t = time.perf_counter()
        build_shards(SAMPLE, shards)
        print(f"# built the sample shards in {time.perf_counter() - t:.1f} s")
    print(
        f"# train records per epoch: {load_manifest(shards)['splits']['train']['records']}, epochs {args.epochs}"
    )
    rows = [("none (raw records)", None, 0), ("stand-in pad collate", standin_collate, 0)]
    rows += [(name, fn, 0) for name, fn in modeling_collates(shards).items()]
    rows += [(name, fn, 1) for name, fn, w in rows[1:]]
    # records/CPU-s is this process's CPU only: the single-core figure when workers=0, and the
    # trainer-side cost when workers=1 (the worker process does the reading and collating).
    print(f"| {'collate':<30} | workers | records/s (wall) | records/CPU-s | x training rate (wall) |")
    print(f"|{'-' * 32}|---------|------------------|---------------|------------------------|")
    for name, fn, workers in rows:
        wall, cpu = measure(shards, fn, workers, args.epochs, args.batch_size)
        print(
            f"| {name:<30} | {workers:>7} | {wall:>16,.0f} | {cpu:>13,.0f} | {wall / TRAIN_RECORDS_PER_S:>21.0f}x |"
        )


if __name__ == "__main__":
    main()
