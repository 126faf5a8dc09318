"""benchmarks/quality_amazon.py (issue 18): every row is a valid config of the recipe it claims, the
report's figures from row files, and its command line's refusals."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys

import pytest

from configs import load_config
from tests.conftest import REPO, subprocess_env

sys.path.insert(0, str(REPO))
from benchmarks import quality_amazon as qa  # noqa: E402

SCRIPT = REPO / "benchmarks" / "quality_amazon.py"


def test_every_row_is_a_valid_config_at_the_batch_it_was_measured_with():
    rows = qa.rows()
    for name, row in rows.items():
        cfg = load_config(REPO / qa.RECIPE, row.overrides)
        if re.fullmatch(r"(toys|sports)_s\d+", name):  # the recipe's own seeds
            assert cfg.train.micro_batch_size == 256, name
        elif name != "sports_recipe_batch256":  # probes and levers: measured on the batch-128 recipe
            assert cfg.train.micro_batch_size == 128, name
    assert sorted(n for n, r in rows.items() if r.headline) == sorted(
        f"{s}_s{k}" for s in qa.FILES for k in qa.SEEDS
    )
    assert (
        load_config(REPO / qa.RECIPE, rows["sports_recipe_batch256"].overrides).train.micro_batch_size == 256
    )


def _row(name: str, data_set: str, valid: float, ndcg: float, hr: float) -> dict:
    return {"row": name, "data_set": data_set, "title": "t", "overrides": [], "wall_s": 600.0, "cpu_s": 300.0,
            "steps": 760, "best_checkpoint": "step_00000760", "best_valid_ndcg@10": valid,
            "valid_curve": [], "test": {"ndcg@10": ndcg, "hr@10": hr}, "curve": []}  # fmt: skip


def test_report_gives_mean_std_ratio_and_the_confirmation(tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()
    toys = {1: 0.0656, 2: 0.0664, 3: 0.0654}
    for seed, ndcg in toys.items():
        (rows / f"toys_s{seed}.json").write_text(
            json.dumps(_row(f"toys_s{seed}", "toys", 0.079, ndcg, 0.107))
        )
    for seed, valid in {4: 0.0447, 5: 0.0450, 6: 0.0445}.items():
        (rows / f"sports_s{seed}.json").write_text(
            json.dumps(_row(f"sports_s{seed}", "sports", valid, 0.0356, 0.06))
        )
    text = qa.report(tmp_path)
    mean, std = statistics.mean(toys.values()), statistics.stdev(toys.values())
    assert f"| toys | 3 | {mean:.4f} ± {std:.4f} |" in text
    assert f"| {mean / 0.0580:.3f} |" in text  # x the best published Toys NDCG@10 (SASRec + sampled softmax)
    assert "seeds: toys 3;" in text and "| sports | 3 |" not in text  # seeds 4-6 are not the headline
    valid = statistics.mean([0.0447, 0.0450, 0.0445])
    assert f"| sports | batch 256 (configs/sequential.yaml) | 4, 5, 6 | {valid:.5f} ± " in text


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--rows", "bogus"], "unknown rows ['bogus']"),
        (["--report-only"], "no finished rows in"),
        (["--report-only", "--rows", "toys_s1"], "--report-only runs none"),
    ],
)
def test_bad_command_lines_exit_2_with_one_line(tmp_path, args, says):
    p = _cli("--out", str(tmp_path / "out"), *args)
    assert p.returncode == 2 and says in p.stderr.splitlines()[-1]
    assert not (tmp_path / "out").exists()  # nothing written for a refused command
