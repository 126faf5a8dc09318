"""Reader throughput (records/s) in one process on the bundled ml-latest-small sample.

    OMP_NUM_THREADS=1 python benchmarks/reader_throughput.py [--shards DIR] [--epochs 3] [--batch-size 256]

Every row reads the train split through the one loader factory, ``modeling.data.build_loader``: raw
records (no tokenizer), a stand-in collate that only pads item ids into tensors (the floor of any
collate), then the collated batches exactly as the trainer gets them (``build_loader`` with the
tokenizer, for the ids and the text prompt). ``num_workers=0`` is the honest single-core figure;
``num_workers=1`` shows the DataLoader path. The last column compares with the training consumption
rate of the tiny test model (~0.8 s per 256-record step on one core).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the project's packages, not only what the venv installed

from configs import RecGPTConfig, load_config  # noqa: E402
from data_shards.manifest import load_manifest, read_items  # noqa: E402
from data_shards.reader import ShardLoader  # noqa: E402
from modeling.data import build_loader  # noqa: E402

SAMPLE = REPO / "data" / "ml-latest-small.zip"
TRAIN_RECORDS_PER_S = 256 / 0.8  # tiny 2-layer GPT, batch 256 x 50 tokens, one core


def standin_collate(records: list[dict]) -> dict[str, torch.Tensor]:
    """Pads item ids into input/label tensors, as a tokenizing collate would (no tokenizer)."""
    width = max(len(r["items"]) for r in records)
    ids = torch.full((len(records), width), -100, dtype=torch.long)
    for row, r in enumerate(records):
        ids[row, : len(r["items"])] = torch.tensor(r["items"])
    return {"input_ids": ids[:, :-1].clamp(min=0), "attention_mask": ids[:, :-1] >= 0, "labels": ids[:, 1:]}


def _config(shards: str, prompt: str = "ids") -> RecGPTConfig:
    return load_config(None, [f"data.shards={shards}", f"model.prompt={prompt}"])


def tokenizers(shards: str) -> dict[str, object]:
    """The tokenizer ``modeling.factory`` builds for the ids and the text prompt (as training does)."""
    from modeling.factory import build_model_and_tokenizer

    return {
        prompt: build_model_and_tokenizer(_config(shards, prompt), shards)[1] for prompt in ("ids", "text")
    }


def loaders(shards: str, batch_size: int, workers: int, toks: dict[str, object]) -> dict[str, ShardLoader]:
    """The rows' train loaders, all from ``build_loader``."""
    cfg = _config(shards)
    out = {"none (raw records)": build_loader(cfg, "train", batch_size=batch_size, num_workers=workers)}
    # The stand-in is deliberately not the trainer's collate: a floor for what turning records into
    # tensors costs, so it replaces the collate of a raw-record loader.
    standin = build_loader(cfg, "train", batch_size=batch_size, num_workers=workers)
    standin.collate_fn = standin_collate
    out["stand-in pad collate"] = standin
    items = read_items(shards)
    for prompt, tokenizer in toks.items():
        out[f"build_loader collate ({prompt})"] = build_loader(
            _config(shards, prompt), "train", tokenizer, items, batch_size=batch_size, num_workers=workers
        )
    return out


def measure(loader: ShardLoader, epochs: int) -> tuple[float, float]:
    """(records per wall second, records per CPU second of this process)."""
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
        from launcher.cli import main as cli

        shards = str(Path(tempfile.mkdtemp()) / "ml-latest-small")
        t = time.perf_counter()
        assert cli(["shards", "build", str(SAMPLE), "--out", shards]) == 0
        print(f"# built the sample shards in {time.perf_counter() - t:.1f} s")
    print(
        f"# train records per epoch: {load_manifest(shards)['splits']['train']['records']}, epochs {args.epochs}"
    )
    # records/CPU-s is this process's CPU only: the single-core figure when workers=0, and the
    # trainer-side cost when workers=1 (the worker process does the reading and collating).
    print(f"| {'collate':<30} | workers | records/s (wall) | records/CPU-s | x training rate (wall) |")
    print(f"|{'-' * 32}|---------|------------------|---------------|------------------------|")
    toks = tokenizers(shards)
    for workers in (0, 1):
        for i, (name, loader) in enumerate(loaders(shards, args.batch_size, workers, toks).items()):
            if workers and i == 0:
                continue  # raw records are measured in this process only
            wall, cpu = measure(loader, args.epochs)
            print(
                f"| {name:<30} | {workers:>7} | {wall:>16,.0f} | {cpu:>13,.0f} | {wall / TRAIN_RECORDS_PER_S:>21.0f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
