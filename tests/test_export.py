"""recgpt export: ZeRO-2/3 checkpoints of LoRA and full runs (2 processes) -> plain HF directories;
freeze tuning and SGD: train, resume exactly, export.

One small shard set (60 MovieLens users, 300 items) and four 3-step training runs are shared by every
test here (session fixtures); tests/test_recommend.py covers recommend on an untrained export.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from configs import CheckpointError, ExportError, load_config
from launcher.cli import main
from modeling.export import WRAPPER_KEY_PARTS
from modeling.serving import MANIFEST, load_export, score_batch, verify_export
from trainer.checkpoint import write_complete
from trainer.export import export_checkpoint

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUNS = {
    "lora-z2": ["lora.enabled=true", "zero.stage=2"],
    "lora-z3": ["lora.enabled=true", "zero.stage=3"],
    "full-z2": ["zero.stage=2"],
    "full-z3": ["zero.stage=3"],
}


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """60 users' ratings of the 300 most rated movies, as a generic CSV -> shards (a few seconds)."""
    root = tmp_path_factory.mktemp("export-data")
    with zipfile.ZipFile(REPO / "data" / "ml-latest-small.zip") as z:
        names = {Path(n).name: n for n in z.namelist()}
        ratings = list(csv.DictReader(io.TextIOWrapper(z.open(names["ratings.csv"]), encoding="utf-8")))
        titles = {
            r["movieId"]: r["title"]
            for r in csv.DictReader(io.TextIOWrapper(z.open(names["movies.csv"]), encoding="utf-8"))
        }
    counts: dict[str, int] = {}
    for r in ratings:
        counts[r["movieId"]] = counts.get(r["movieId"], 0) + 1
    top = set(sorted(counts, key=lambda m: (-counts[m], int(m)))[:300])
    users = sorted({r["userId"] for r in ratings}, key=int)[:60]
    path = root / "log.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "rating", "timestamp", "title"])
        for r in ratings:
            if r["userId"] in users and r["movieId"] in top:
                w.writerow([r["userId"], r["movieId"], r["rating"], r["timestamp"], titles[r["movieId"]]])
    out = root / "shards"
    _run([sys.executable, "-m", "launcher", "shards", "build", str(path), "--format", "csv", "--out", str(out),
          "--rating-col", "rating", "--title-col", "title", "--max-history", "20"])  # fmt: skip
    return out


def _train(shards: Path, out: Path, overrides: list[str]) -> Path:
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "launcher", "train",
          "--config", "configs/tiny.yaml", f"data.shards={shards}", f"train.output_dir={out}",
          "train.max_steps=3", "train.eval_interval=0", "train.checkpoint_interval=0", "data.num_workers=0",
          "data.max_history=20", "train.micro_batch_size=8", "eval.batch_size=16", "optim.lr=0.05",
          "schedule.warmup_steps=0", "model.tokenizer_vocab_size=300", "logging.tensorboard=false",
          "logging.progress=none", *overrides], timeout=600)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def export_of(small_shards, tmp_path_factory):
    """``export_of(name) -> (run dir, export dir)``: the 2-process run ``name`` of RUNS (large learning
    rate so adapters move) and its export (small shards force several safetensors files + index), each
    made once per session on first use."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            run = _train(small_shards, tmp_path_factory.mktemp(f"run-{name}") / "run", RUNS[name])
            out = tmp_path_factory.mktemp(f"export-{name}") / "model"
            export_checkpoint(run, out, save_adapter=name.startswith("lora"), max_shard_size="200KB")
            cache[name] = (run, out)
        return cache[name]

    return get


# --------------------------------------------------------------------------- the directory


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(RUNS))
def test_export_directory(export_of, name):
    run, out = export_of(name)
    manifest = json.loads((out / MANIFEST).read_text())
    verify_export(out)  # sha256 of every file
    assert manifest["step"] == 3 and manifest["source_checkpoint"].endswith("step_00000003")
    assert manifest["zero_stage"] == int(name[-1]) and manifest["world_size"] == 2
    assert manifest["parity"]["examples"] > 0 and manifest["parity"]["max_abs_diff"] <= 1e-4
    assert manifest["config"]["lora"]["enabled"] == name.startswith("lora")
    assert manifest["metrics"] and "ndcg@10" in manifest["metrics"]
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "items.jsonl", "config.yaml"} <= files
    assert (
        "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    )
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    keys = []
    for f in out.glob("model*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            keys += list(st.keys())
    assert keys and not [k for k in keys if any(part in k for part in WRAPPER_KEY_PARTS)]
    cfg_ids = json.loads((out / "config.json").read_text())
    gen_ids = json.loads((out / "generation_config.json").read_text())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        assert cfg_ids[key] == gen_ids[key] == getattr(tok, key) is not None
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    # Item i is token id recgpt_first_item_token_id + i: ids past the tokenizer's own, no token strings.
    first = tok.init_kwargs["recgpt_first_item_token_id"]
    assert items[5]["token_id"] == first + 5 and first == len(tok) and "token" not in items[5]
    if name.startswith("lora"):  # the adapter alone, non-empty (the ZeRO-3 pitfall)
        with safe_open(str(out / "adapter" / "adapter_model.safetensors"), framework="pt") as st:
            shapes = {k: st.get_slice(k).get_shape() for k in st.keys()}
        assert shapes and all(all(d > 0 for d in s) for s in shapes.values())
        assert any("lora_B" in k for k in shapes)


@pytest.mark.parametrize("name", ["lora-z2", "full-z3"])
def test_item_rows_trained_and_merged(export_of, name):
    """The merge folded something in: the item rows differ from the initial (identical, mean) rows."""
    _, out = export_of(name)
    model, *_ = load_export(out)
    rows = model.causal_lm.get_input_embeddings().weight[model.item_token_ids]
    assert float((rows - rows[0]).detach().abs().max()) > 1e-3, name


# --------------------------------------------------------------------------- serving without recgpt


@pytest.mark.parametrize("name", ["lora-z3", "full-z2"])
def test_loads_with_plain_transformers_without_recgpt(export_of, name, tmp_path):
    _, out = export_of(name)
    model, tok, items, _ = load_export(out)
    ids = [tok.bos_token_id, *model.item_token_ids[[3, 1, 4]].tolist()]
    with torch.no_grad():
        want = model.item_logits(model(input_ids=torch.tensor([ids]))[:, -1])[0]
    # Only the venv's site-packages on sys.path: no .pth files (-S), so no editable-install finder; cwd
    # outside the repository.
    script = f"""
import json, sys
sys.path[:] = [p for p in sys.path if p] + [{sysconfig.get_paths()["purelib"]!r}]
try:
    import launcher  # noqa
    sys.exit("recgpt is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(out)!r})
lm = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32).eval()
ids = {ids!r}
item_ids = [json.loads(line)["token_id"] for line in open({str(out / "items.jsonl")!r})]
with torch.no_grad():
    logits = lm(torch.tensor([ids])).logits[0, -1, item_ids]
print(json.dumps({{"logits": logits.tolist(), "eos": tok.eos_token_id, "eos_cfg": lm.config.eos_token_id,
                  "gen_eos": lm.generation_config.eos_token_id, "modules": sorted(m for m in sys.modules if m.split('.')[0] in ("launcher", "modeling", "trainer", "data_shards"))}}))
"""
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["modules"] == []
    assert got["eos"] == got["eos_cfg"] == got["gen_eos"]
    assert torch.allclose(torch.tensor(got["logits"]), want, atol=1e-4)


# --------------------------------------------------------------------------- evaluate(export) == evaluate(checkpoint)


@pytest.mark.distributed
def test_evaluate_export_equals_checkpoint(export_of, small_shards):
    run, out = export_of("lora-z2")

    def metrics(*source: str) -> dict:
        res = _run([sys.executable, "-m", "launcher", "evaluate", *source, "--split", "valid"])
        line = json.loads(res.stdout.strip().splitlines()[-1])
        return {k: v for k, v in line.items() if k[:2] in ("hr", "nd", "mr", "nu")}

    from_export, from_ckpt = metrics("--model", str(out)), metrics("--checkpoint", str(run))
    valid = json.loads((small_shards / "manifest.json").read_text())["splits"]["valid"]["records"]
    assert from_export == from_ckpt and from_export["num_examples"] == valid


# --------------------------------------------------------------------------- dtype, parity, atomicity


def test_bf16_export_and_parity_failure(export_of, tmp_path, monkeypatch):
    run, _ = export_of("lora-z2")
    manifest = export_checkpoint(run, tmp_path / "bf16", dtype="bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as st:
        assert all(st.get_tensor(k).dtype == torch.bfloat16 for k in st.keys())
    assert manifest["parity"]["max_abs_diff"] <= manifest["parity"]["tolerance"]

    # A merge that loses the adapters must fail the parity check and leave nothing behind.
    import modeling.export as ex

    real = ex._merged_lm

    def broken(model):
        lm = real(model)
        with torch.no_grad():
            w = lm.get_input_embeddings().weight
            w[model.item_token_ids] += 0.1 * torch.randn_like(w[model.item_token_ids])
        return lm

    monkeypatch.setattr(ex, "_merged_lm", broken)
    with pytest.raises(ExportError, match="parity check failed"):
        export_checkpoint(run, tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16"]


def test_bad_checkpoints_are_one_line_errors(export_of, small_shards, tmp_path, capsys):
    run, out = export_of("full-z3")
    ckpt = run / "checkpoints" / "step_00000003"
    capsys.readouterr()  # the fixture's own output, when the export was made for this test

    def err(*args: str) -> str:
        assert main(["export", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in lines[0], lines
        return lines[0]

    assert "no such checkpoint" in err("--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert "exists" in err("--checkpoint", str(run), "--out", str(out))

    incomplete = tmp_path / "incomplete"
    shutil.copytree(ckpt, incomplete)
    (incomplete / "COMPLETE").unlink()
    assert "COMPLETE" in err("--checkpoint", str(incomplete), "--out", str(tmp_path / "o"))

    # COMPLETE lists every file with its size and sha256: a damaged checkpoint is refused naming the file.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    optim = sorted(corrupt.glob("ds/*/*optim_states.pt"))[-1]
    optim.write_bytes(optim.read_bytes()[:1000])
    rel = optim.relative_to(corrupt).as_posix()
    assert f"damaged checkpoint ({rel}: 1000 bytes" in err(
        "--checkpoint", str(corrupt), "--out", str(tmp_path / "o")
    )

    missing_rank = tmp_path / "missing_rank"
    shutil.copytree(ckpt, missing_rank)
    optim = sorted(missing_rank.glob("ds/*/*optim_states.pt"))[-1]
    optim.unlink()
    rel = optim.relative_to(missing_rank).as_posix()
    assert f"({rel}: missing)" in err("--checkpoint", str(missing_rank), "--out", str(tmp_path / "o"))

    # An old-format COMPLETE (one line, no file list) cannot be verified: consolidation's own checks.
    for d in (corrupt, missing_rank):
        (d / "COMPLETE").write_text("step_00000003\n")
    with pytest.raises(CheckpointError, match="cannot consolidate"):
        export_checkpoint(corrupt, tmp_path / "o")
    with pytest.raises(CheckpointError, match="2 ranks"):
        export_checkpoint(missing_rank, tmp_path / "o")
    capsys.readouterr()  # their "cannot be verified" lines

    other = tmp_path / "other_model"
    shutil.copytree(ckpt, other)
    cfg = (other / "config.yaml").read_text()
    # tiny has 2 layers (saved as null = the preset's, or as 2 by older versions)
    (other / "config.yaml").write_text(re.sub(r"n_layer: \S+", "n_layer: 3", cfg))
    assert "damaged checkpoint (config.yaml: " in err(
        "--checkpoint", str(other), "--out", str(tmp_path / "o")
    )
    write_complete(other, "step_00000003", 3, 2)  # as if written so: the weights do not fit
    assert "do not fit" in err("--checkpoint", str(other), "--out", str(tmp_path / "o"))

    # The run's shard directory is gone: the error names the config key, not a flag.
    moved = tmp_path / "moved_shards"
    shutil.copytree(ckpt, moved)
    cfg = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(cfg.replace(str(small_shards), str(tmp_path / "no-shards")))
    write_complete(moved, "step_00000003", 3, 2)
    assert "data.shards" in err("--checkpoint", str(moved), "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_force_replaces_and_scores_match(export_of, small_shards, tmp_path, capsys):
    run, out = export_of("full-z2")
    target = tmp_path / "model"
    shutil.copytree(out, target)
    (target / "stale.txt").write_text("old")
    assert main(["export", "--checkpoint", str(run), "--best", "--out", str(target), "--force"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["parity"]["max_abs_diff"] <= 1e-4 and not (target / "stale.txt").exists()
    verify_export(target)
    # The same valid batch scores the same through load_export of either export.
    from modeling.data import build_loader

    m1, tok, items, spec = load_export(out)
    m2, *_ = load_export(target)
    cfg = load_config(out / "config.yaml", saved=True)
    batch = next(
        iter(build_loader(cfg, "valid", tok, items, shards=small_shards, batch_size=8, num_workers=0))
    )
    assert torch.equal(score_batch(m1, batch, spec.task), score_batch(m2, batch, spec.task))


# --------------------------------------------------------------------------- recommend from an export
# (here rather than in test_recommend.py: they share this module's session runs)


def test_recommend_cli(export_of, small_shards, tmp_path, capsys):
    _, out = export_of("lora-z2")
    _, _, items, _ = load_export(out)
    ids = [it["item_id"] for it in items]

    assert main(["recommend", "--model", str(out), "--history", ",".join(ids[:3]), "-k", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recs = got["recommendations"]
    assert [r["rank"] for r in recs] == [1, 2, 3, 4] and got["history"] == ids[:3]
    assert all(r["score"] >= s["score"] for r, s in zip(recs, recs[1:]))
    assert {"item_id", "title", "score", "prob"} <= set(recs[0])

    # By default (as eval.exclude_seen) a history item is never returned; k counts what is left.
    history = [r["item_id"] for r in recs[:2]]
    assert main(["recommend", "--model", str(out), "--history", ",".join(history), "-k", "3", "--json"]) == 0
    got2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recs2 = got2["recommendations"]
    assert got2["exclude_seen"] is True
    assert len(recs2) == 3 and not {r["item_id"] for r in recs2} & set(history)
    # --include-seen ranks every item, the history too.
    assert main(["recommend", "--model", str(out), "--history", ",".join(history), "-k", str(len(ids)),
                 "--json", "--include-seen"]) == 0  # fmt: skip
    got3 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got3["exclude_seen"] is False and len(got3["recommendations"]) == len(ids)
    assert set(history) <= {r["item_id"] for r in got3["recommendations"]}

    # Titles from a JSON file, table output.
    hist = tmp_path / "h.json"
    hist.write_text(json.dumps([items[0]["title"], int(ids[1])]))
    assert main(["recommend", "--model", str(out), "--history-file", str(hist), "-k", "2"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split()[:3] == ["rank", "item_id", "score"] and len(table) == 3

    # Unknown items: one line, exit 2.
    assert main(["recommend", "--model", str(out), "--history", f"{ids[0]},no-such-id"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-id" in err[0]


def test_recommend_scores_equal_evaluation_prompt(export_of, small_shards):
    """recommend builds the prompt exactly as evaluation does: same logits for a valid record's history."""
    from modeling.data import build_loader
    from modeling.serving import recommend

    _, out = export_of("lora-z2")
    model, tok, items, spec = load_export(out)
    cfg = load_config(out / "config.yaml", saved=True)
    record = next(iter(build_loader(cfg, "valid", shards=small_shards, batch_size=1, num_workers=0)))[0]
    batch = build_loader(cfg, "valid", tok, items, shards=small_shards).collate_fn([record])
    want = score_batch(model, batch, spec.task)[0]
    history = record["items"][:-1]
    top = recommend(model, tok, items, spec, history, k=5, exclude_seen=False)
    best = want.topk(5)
    assert [r["item_id"] for r in top] == [items[i]["item_id"] for i in best.indices.tolist()]
    assert torch.allclose(torch.tensor([r["score"] for r in top]), best.values, atol=1e-5)


# --------------------------------------------------------------------------- freeze tuning and SGD

PARTIAL = {
    "freeze-z0": ["zero.stage=0", "model.trainable_layers=1"],
    # Items and head only; ZeRO-1 saves the frozen weights only in the module state dict.
    "freeze-items-z1": ["zero.stage=1", "model.trainable_layers=0"],
    # SGD under ZeRO-3 (DeepSpeed's untested-optimizer path) with frozen weights; its lr is ~100x
    # AdamW's (unnormalised steps).
    "freeze-sgd-z3": ["zero.stage=3", "model.trainable_layers=1", "optim.name=sgd", "optim.lr=1.0"],
}
SIX_STEPS = ["train.max_steps=6", "train.checkpoint_interval=2", "train.keep_last=3", "train.log_interval=1",
             "schedule.warmup_steps=1"]  # fmt: skip


def _losses(run: Path) -> dict[int, float]:
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in log if r["kind"] == "train"}  # a resumed step: the last value


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(PARTIAL))
def test_freeze_and_sgd_train_resume_exactly_and_export(small_shards, tmp_path, name):
    """2 processes, 6 steps, checkpoints at 2/4/6. Freeze tuning: between checkpoints 2 and 6 every
    frozen weight is bit-identical (under ZeRO-3 partitioning too) and every trainable one moved.
    Resumed from checkpoint 4, steps 5-6 and the final weights equal the uninterrupted run's. The
    export (PEFT trainable tokens merged, a plain model) passes the parity check and holds the
    trained item rows."""
    from trainer.checkpoint import consolidate

    overrides = [*PARTIAL[name], *SIX_STEPS]
    run = _train(small_shards, tmp_path / "run", overrides)
    cfg = load_config(run / "config.yaml", saved=True)
    ckpts = run / "checkpoints"
    first, last = (consolidate(ckpts / f"step_0000000{s}", 2) for s in (2, 6))
    assert first.keys() == last.keys()
    moved = {k for k in first if not torch.equal(first[k], last[k])}
    n = cfg.model.trainable_layers
    assert n == (0 if "items" in name else 1) and cfg.optim.name == ("sgd" if "sgd" in name else "adamw")
    # The top block (of 2) and the item rows (the tied head's are the same tensor) moved, nothing else.
    trained = {k for k in first if "trainable_tokens_delta" in k or (n and ".h.1." in k)}
    assert moved == trained and "lm.base_model.model.transformer.wte.trainable_tokens_delta.default" in moved
    assert n == 0 or "lm.base_model.model.transformer.h.1.mlp.c_fc.weight" in moved
    ref = _losses(run)
    assert all(torch.isfinite(torch.tensor(v)) for v in ref.values()) and sorted(ref) == [1, 2, 3, 4, 5, 6]

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    for pointer in ("latest", "best"):
        (resumed / "checkpoints" / pointer).write_text("step_00000004")
    (resumed / "metrics.json").unlink()
    _train(small_shards, resumed, overrides)
    again = _losses(resumed)
    assert [again[s] for s in (5, 6)] == pytest.approx([ref[5], ref[6]], abs=1e-6)
    final = consolidate(resumed / "checkpoints" / "step_00000006", 2)
    for k, v in last.items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=1e-6, msg=k)

    manifest = export_checkpoint(resumed, tmp_path / "export")
    assert manifest["parity"]["max_abs_diff"] <= 1e-5 and manifest["step"] == 6
    model, *_ = load_export(tmp_path / "export")
    exported = dict(model.causal_lm.named_parameters())
    items = exported["transformer.wte.weight"][model.item_token_ids]
    assert torch.equal(items, last["lm.base_model.model.transformer.wte.trainable_tokens_delta.default"])
    for block in ("h.0", "h.1"):
        assert torch.equal(exported[f"transformer.{block}.mlp.c_fc.weight"],
                           last[f"lm.base_model.model.transformer.{block}.mlp.c_fc.weight"])  # fmt: skip
