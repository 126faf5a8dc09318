"""``benchmarks/scale.py`` (issue 15 item 6) end to end at CI size: two tiny synthetic logs through every
path (build, reader, sampled-softmax training, evaluation, export, recommend), the figures checked
against the artefacts they describe, and a rerun that measures nothing again."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SIZES = (12_000, 20_000)
ITEMS = 2_000
STEPS = 10  # two log windows of 5: the first is warm-up, one is measured
EVAL_USERS = 50
REQUESTS = 10


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale", REPO / "benchmarks" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(workdir: Path) -> tuple[list[dict], list[str]]:
    """Runs the script; its rows (the last JSON line) and the Markdown table's lines."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--sizes", *map(str, SIZES),
           "--items", str(ITEMS), "--workdir", str(workdir), "--train-steps", str(STEPS),
           "--eval-users", str(EVAL_USERS), "--requests", str(REQUESTS), "--negatives", "256",
           "--reader-records", "2000"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    lines = p.stdout.strip().splitlines()
    return json.loads(lines[-1])["rows"], [ln for ln in lines if ln.startswith("|")]


def test_percentile_is_numpys_linear_one():
    scale = _scale_module()
    values = list(np.random.default_rng(0).exponential(size=37))
    for q in (0, 50, 99, 100):
        assert scale._percentile(values, q) == pytest.approx(np.percentile(values, q))


@pytest.mark.slow  # six subprocesses per size, each importing torch: ~25 s a size on one core
def test_scale_table_end_to_end_and_resumed(tmp_path):
    rows, table = _bench(tmp_path)
    assert len(rows) == len(SIZES) and len(table) == 2 + len(SIZES)
    for size, row, line in zip(SIZES, rows, table[2:]):
        d = tmp_path / f"{size}-{ITEMS}"
        manifest = json.loads((d / "shards" / "manifest.json").read_text())
        assert (row["interactions"], row["users"], row["items"]) == (
            manifest["num_interactions"], manifest["num_users"], manifest["num_items"],
        )  # fmt: skip
        assert 0.9 * size <= row["interactions"] <= size and row["items"] <= ITEMS
        assert line.startswith(f"| {row['interactions']:,} | {row['items']:,} | {row['users']:,} |")
        for key in ("build_wall_s", "build_peak_rss_gib", "reader_rec_per_s", "train_samples_per_s",
                    "train_step_s", "eval_s", "eval_users_per_s", "export_s", "recommend_p50_ms",
                    "split_forward_ms", "split_backward_ms", "split_optimizer_ms"):  # fmt: skip
            assert row[key] > 0, key
        assert row["recommend_p99_ms"] >= row["recommend_p50_ms"]
        # The step split timed the trainer's model over this catalogue: its parameters are the run's.
        assert row["split_parameters"] == json.loads((d / "run" / "metrics.json").read_text())["parameters"]
        assert row["split_steps"] == 10
        # One measured window (the first is warm-up) of micro-batches of 32 on one process.
        assert row["train_windows"] == STEPS // 5 - 1
        assert row["train_samples_per_s"] * row["train_step_s"] == pytest.approx(32)
        saved = yaml.safe_load((d / "run" / "config.yaml").read_text())
        assert saved["train"]["loss"] == "sampled" and saved["train"]["num_negatives"] == 256
        assert saved["eval"]["max_users"] == EVAL_USERS
        # The run's one validation (at its last step) ranked exactly those users too.
        assert json.loads((d / "run" / "metrics.json").read_text())["num_examples"] == EVAL_USERS
        # Exactly the asked number of users ranked over the whole catalogue, and of requests timed.
        assert row["eval_users"] == EVAL_USERS and row["requests"] == REQUESTS
        assert row["eval_users_per_s"] == pytest.approx(EVAL_USERS / row["eval_s"])
        size_mib = sum(f.stat().st_size for f in (d / "export").rglob("*") if f.is_file()) / 2**20
        assert row["export_mib"] == pytest.approx(size_mib) and size_mib > 0
    # A rerun with the same settings measures nothing again: the same figures, to the last digit.
    again, table_again = _bench(tmp_path)
    assert again == rows and table_again == table
