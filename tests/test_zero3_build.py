"""Under ZeRO-3 no rank ever holds the whole model: it is created partitioned, initialised once, and the
same on every rank (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import BIN, REPO, TINY, subprocess_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = """
import json, sys
import torch
import deepspeed
from configs import load_config
from trainer.engine import deepspeed_config
from trainer.distributed import setup_distributed
from modeling.factory import build_model_and_tokenizer

info = setup_distributed()
cfg = load_config(sys.argv[1], sys.argv[3:])
model, _ = build_model_and_tokenizer(cfg, cfg.data.shards, ds_config=deepspeed_config(cfg, info.world_size))
params = list(model.parameters())
base = [p for n, p in model.named_parameters() if "lora_" not in n and "trainable_tokens" not in n]
held_now = sum(p.numel() for p in base)
local = sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
full = sum(p.ds_numel for p in params if hasattr(p, "ds_numel"))
with deepspeed.zero.GatheredParameters(params):
    rows = model.embed(model.item_token_ids)  # through the module: also right under PEFT's token wrapper
    first = next(p for n, p in model.named_parameters() if "lora_A" in n) if cfg.lora.enabled else rows
    out = {"lm": type(model.causal_lm).__name__, "partitioned": all(hasattr(p, "ds_id") for p in base), "held_now": held_now, "local": local, "full": full,
           "item_std": float(rows.std()), "checksum": float(rows.double().sum()), "adapter_checksum": float(first.double().abs().sum())}
json.dump(out, open(f"{sys.argv[2]}.{info.rank}", "w"))
"""


@pytest.mark.parametrize(
    "extra",
    [[], ["lora.enabled=true"], ["model.architecture=ligr"]],
    ids=["full", "lora", "ligr"],
)
def test_zero3_model_is_built_partitioned_and_equal_on_every_rank(sample_shards, tmp_path, extra):
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    overrides = [f"data.shards={sample_shards}", "zero.stage=3", "model.item_init=random", *extra]
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(TINY),
        str(out),
        *overrides,
    ]
    env = subprocess_env(PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1))
    for r in (r0, r1):
        # Outside GatheredParameters no base weight is whole (adapters are partitioned by initialize).
        assert r["partitioned"] and r["held_now"] == 0
        assert r["local"] <= r["full"] / 2 + 2 * 64  # each rank keeps its half (+ padding)
        assert 0.015 < r["item_std"] < 0.025  # initialised (GPT-2 std 0.02), not left empty or N(0, 1)
    assert r0["checksum"] == r1["checksum"] and r0["adapter_checksum"] == r1["adapter_checksum"]
    assert r0["lm"] == ("LiGRForCausalLM" if "model.architecture=ligr" in extra else "GPT2LMHeadModel")
