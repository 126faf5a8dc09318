"""model.architecture=ligr: the gated block against its formula, causality and padding, the preset
through the factory (LoRA, freeze tuning, checkpointing, warm start), and a short ``recgpt train`` ->
export -> plain transformers (remote code, no recgpt) / recommend / evaluate.

The factory tests reuse tests/test_modeling_models.py's tiny item vocabulary and helpers; the end-to-end
test uses the bundled sample's shards (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modeling.factory import build_model_and_tokenizer
from modeling.ligr import LiGRBlock, LiGRConfig, LiGRForCausalLM, LiGRModel
from tests.conftest import recgpt_train, train_log
from tests.test_modeling_models import _cfg, _collate, _items, _records, _train, vocabulary_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """What the factory reads of a shard directory: tests/test_modeling_models.py's 24 items."""
    return vocabulary_shards(tmp_path_factory.mktemp("shards"))


def _config(**kw) -> LiGRConfig:
    base = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=24, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                activation_dropout=0.0)  # fmt: skip
    return LiGRConfig(**{**base, **kw})


def _randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter ~ N(0, 0.3) (biases and norms included, so none of them is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


# --------------------------------------------------------------------------- the block


def test_closed_gates_make_a_block_the_identity():
    block = _randomised(LiGRBlock(_config()))
    with torch.no_grad():
        for gate in (block.attn_gate, block.ffn_gate):
            gate.weight.zero_()
            gate.bias.fill_(-1e4)  # sigmoid(-1e4) is exactly 0 in fp32
    x = torch.randn(3, 7, 16)
    assert torch.equal(block(x), x)


def _reference_block(block: LiGRBlock, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The LiGR formula written out with matrices: x [B, T, d], real [B, T] bool (False = padding)."""
    d, heads = x.shape[-1], block.self_attn.num_heads
    hd = d // heads

    def lin(m, z):
        return z @ m.weight.t() + (m.bias if m.bias is not None else 0.0)

    def ln(m, z):
        mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        return (z - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias

    a = block.self_attn
    z = ln(block.attn_norm, x)
    b, t, _ = x.shape
    q, k, v = (lin(m, z).view(b, t, heads, hd).transpose(1, 2) for m in (a.q_proj, a.k_proj, a.v_proj))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # [B, heads, T, T]
    allowed = torch.ones(t, t, dtype=torch.bool).tril() & (
        real[:, None, None, :] | torch.eye(t, dtype=torch.bool)
    )
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    attn = lin(a.o_proj, (probs @ v).transpose(1, 2).reshape(b, t, d))
    h = x + torch.sigmoid(lin(block.attn_gate, x)) * attn
    m = block.mlp
    z = ln(block.ffn_norm, h)
    ffn = lin(m.down_proj, F.silu(lin(m.gate_proj, z)) * lin(m.up_proj, z))
    return h + torch.sigmoid(lin(block.ffn_gate, h)) * ffn


def test_block_matches_the_written_out_formula():
    from modeling.ligr import causal_padding_mask

    block = _randomised(LiGRBlock(_config()))
    x = torch.randn(2, 6, 16)
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    torch.testing.assert_close(
        block(x, causal_padding_mask(real, 6)), _reference_block(block, x, real.bool())
    )
    torch.testing.assert_close(block(x), _reference_block(block, x, torch.ones(2, 6, dtype=torch.bool)))
    # Gates open (sigmoid = 1): a plain pre-LN block — the gates are all LiGR adds to it.
    with torch.no_grad():
        for gate in (block.attn_gate, block.ffn_gate):
            gate.weight.zero_()
            gate.bias.fill_(1e4)
    y = block(x)
    h = x + block.self_attn(block.attn_norm(x), None)
    torch.testing.assert_close(y, h + block.mlp(block.ffn_norm(h)))


def test_later_tokens_do_not_change_earlier_states():
    model = _randomised(LiGRModel(_config()))
    ids = torch.randint(0, 40, (1, 9))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 40
    a = model(input_ids=ids).last_hidden_state
    b = model(input_ids=changed).last_hidden_state
    assert torch.equal(a[:, :5], b[:, :5])
    assert (a[:, 5:] - b[:, 5:]).abs().amax(-1).min() > 1e-4  # every later position sees the change


def test_right_padding_leaves_real_positions_unchanged():
    model = _randomised(LiGRForCausalLM(_config()))
    short, long = torch.randint(0, 40, (1, 4)), torch.randint(0, 40, (1, 8))
    batch = torch.cat([F.pad(short, (0, 4), value=39), long])
    mask = torch.tensor([[1] * 4 + [0] * 4, [1] * 8])
    out = model(input_ids=batch, attention_mask=mask).logits
    assert torch.isfinite(out).all()  # padded queries attend to themselves: no empty softmax rows
    torch.testing.assert_close(out[0, :4], model(input_ids=short).logits[0])
    torch.testing.assert_close(out[1], model(input_ids=long).logits[0])
    # The padding token's id never matters.
    other = batch.clone()
    other[0, 4:] = 3
    torch.testing.assert_close(model(input_ids=other, attention_mask=mask).logits[0, :4], out[0, :4])


def test_tied_head_and_hf_loss():
    model = LiGRForCausalLM(_config())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.base_model is model.model and model.get_output_embeddings() is model.lm_head
    ids = torch.randint(0, 40, (2, 5))
    out = model(input_ids=ids, labels=ids)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    model.resize_token_embeddings(45)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.shape[0] == 45


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _randomised(LiGRForCausalLM(_config(dropout=0.2, attention_dropout=0.2))).train()
    ids, mask = torch.randint(0, 40, (2, 6)), torch.tensor([[1] * 6, [1] * 3 + [0] * 3])

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks; the recompute replays them (preserved RNG state)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(block.gradient_checkpointing for block in model.model.layers)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- the preset (modeling.factory)


def test_preset_trains_and_takes_lora_and_checkpointing(shards):
    cfg = _cfg("model.architecture=ligr")
    model, tok = build_model_and_tokenizer(cfg, shards)
    lm = model.causal_lm
    assert isinstance(lm, LiGRForCausalLM) and model.tied and lm.config.intermediate_size == 2 * 32
    assert all(p.requires_grad for p in model.parameters())
    batch = _collate(cfg, tok, _items(), "train")(_records(3))
    losses = _train(model, cfg, batch, steps=30, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]

    narrow, _ = build_model_and_tokenizer(_cfg("model.architecture=ligr", "model.ffn_multiplier=1"), shards)
    assert narrow.causal_lm.model.layers[0].mlp.up_proj.weight.shape == (32, 32)

    ckpt_cfg = _cfg("model.architecture=ligr", "model.gradient_checkpointing=true", "model.dropout=0.1")
    ckpt, _ = build_model_and_tokenizer(ckpt_cfg, shards)
    assert all(block.gradient_checkpointing for block in ckpt.causal_lm.model.layers)
    assert all(math.isfinite(x) for x in _train(ckpt, ckpt_cfg, batch, steps=2, lr=1e-2))

    lora, _ = build_model_and_tokenizer(_cfg("model.architecture=ligr", "lora.enabled=true"), shards)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all("lora_" in n or "trainable_tokens" in n for n in trainable)  # gates, norms, positions frozen
    assert any("trainable_tokens" in n for n in trainable)


def test_ffn_multiplier_is_checked_by_the_schema():
    from configs import ConfigError

    assert _cfg("model.architecture=ligr").model.ffn_size() == 64  # n_embd 32 x 2
    assert _cfg().model.ffn_size() == 128  # gpt2: 4 x
    assert _cfg("model.architecture=ligr", "model.ffn_multiplier=1.5").model.ffn_size() == 48
    with pytest.raises(ConfigError, match=r"^model.ffn_multiplier: got 0.0"):
        _cfg("model.architecture=ligr", "model.ffn_multiplier=0")
    with pytest.raises(ConfigError, match=r"^model.ffn_multiplier: only for presets"):
        _cfg("model.preset=null", "model.name_or_path=x", "model.ffn_multiplier=2")
    with pytest.raises(ConfigError, match=r"^model.architecture: .*ligr"):
        _cfg("model.architecture=ligr2")


def test_warm_start_copies_every_weight(shards, tmp_path):
    from modeling.warm_start import WarmStart

    cfg = _cfg("model.architecture=ligr")
    src, tok = build_model_and_tokenizer(cfg, shards)
    with torch.no_grad():  # "trained" weights: anything but the initial ones
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tok.save_pretrained(str(tmp_path))
    state = {k: v.detach().clone() for k, v in src.lm.state_dict().items()}
    warm = WarmStart(
        str(tmp_path), "export", cfg, state, tmp_path, _items(), int(src.item_token_ids[0]), None, {}
    )
    model, _ = build_model_and_tokenizer(cfg, shards, warm_start=warm)
    assert warm.info["items"]["known"] == len(_items())
    for name, value in model.lm.state_dict().items():
        assert torch.equal(value, state[name]), name


# --------------------------------------------------------------------------- train -> export -> serve

SERVE_WITHOUT_RECGPT = """
import json, sys
sys.path[:] = [p for p in sys.path if p] + [{purelib!r}]
try:
    import modeling  # noqa
    sys.exit("recgpt is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
# AutoTokenizer reads config.json too: without trust_remote_code it would ask whether to run ligr.py.
tok = AutoTokenizer.from_pretrained({out!r}, trust_remote_code=True)
lm = AutoModelForCausalLM.from_pretrained({out!r}, dtype=torch.float32, trust_remote_code=True).eval()
ids = {ids!r}
item_ids = [tok.init_kwargs["recgpt_first_item_token_id"] + i for i in range({n})]
with torch.no_grad():
    logits = lm(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0, -1, item_ids]
print(json.dumps({{"logits": logits.tolist(), "class": type(lm).__module__ + "." + type(lm).__name__,
                  "recgpt": sorted(m for m in sys.modules if m.split(".")[0] in ("modeling", "trainer", "launcher"))}}))
"""


@pytest.mark.integration
@pytest.mark.slow
def test_train_export_and_serve_without_recgpt(sample_shards, tmp_path, capsys):
    """30 steps of ``recgpt train model.architecture=ligr`` (one process): the loss falls and the
    metrics are finite and above zero. Its export carries ligr.py and an auto_map: plain transformers in
    a fresh process without recgpt (trust_remote_code=True) gives the checkpoint's logits; ``recgpt
    recommend`` scores with them and ``recgpt evaluate --model`` equals ``--checkpoint``."""
    from configs import load_config
    from launcher.cli import main
    from modeling.collate import first_item_token_id
    from modeling.factory import load_model_for_eval
    from trainer.checkpoint import load_consolidated, resolve_checkpoint
    from trainer.export import export_checkpoint

    run = tmp_path / "run"
    steps = ["train.max_steps=30", "train.eval_interval=30", "train.checkpoint_interval=30", "train.log_interval=1",
             "data.num_workers=0", "logging.tensorboard=false", "logging.progress=none"]  # fmt: skip
    proc = recgpt_train(sample_shards, run, ["model.architecture=ligr", *steps], nproc=1)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    losses = [r["loss"] for r in train_log(run) if r["kind"] == "train"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.3  # ~9.2 -> ~8.3 on 2 cores
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_examples"] == 610 and metrics["step"] == 30
    assert all(math.isfinite(metrics[k]) and metrics[k] > 0 for k in ("hr@10", "ndcg@10", "mrr@10"))

    out = tmp_path / "export"
    manifest = export_checkpoint(run, out)
    assert manifest["parity"]["max_abs_diff"] <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "recgpt_ligr" and (out / "ligr.py").is_file()
    assert config["auto_map"] == {
        "AutoConfig": "ligr.LiGRConfig",
        "AutoModelForCausalLM": "ligr.LiGRForCausalLM",
    }

    # The checkpoint's own logits for a history (BOS + item tokens, as evaluation prompts it).
    ckpt = resolve_checkpoint(run)
    cfg = load_config(ckpt / "config.yaml", saved=True)
    model, tok = load_model_for_eval(cfg, ckpt / "tokenizer", sample_shards)
    load_consolidated(model, ckpt, 1)
    history = [0, 31, 592]
    ids = [tok.bos_token_id, *(first_item_token_id(tok) + i for i in history)]
    with torch.no_grad():
        want = model.item_logits(model(input_ids=torch.tensor([ids]))[:, -1])[0]

    script = SERVE_WITHOUT_RECGPT.format(purelib=sysconfig.get_paths()["purelib"], out=str(out), ids=ids,
                                         n=model.num_items)  # fmt: skip
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["recgpt"] == [] and got["class"].startswith("transformers_modules.")
    assert got["class"].endswith(".ligr.LiGRForCausalLM")
    torch.testing.assert_close(torch.tensor(got["logits"]), want, atol=1e-5, rtol=1e-5)

    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    capsys.readouterr()
    arg = ",".join(items[i]["item_id"] for i in history)
    assert main(["recommend", "--model", str(out), "--history", arg, "-k", "5", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recommendations"]
    best = want.index_fill(0, torch.tensor(history), float("-inf")).topk(5)
    assert [r["item_id"] for r in recs] == [items[i]["item_id"] for i in best.indices.tolist()]
    torch.testing.assert_close(torch.tensor([r["score"] for r in recs]), best.values, atol=1e-5, rtol=1e-5)

    lines = {}
    for source in (["--model", str(out)], ["--checkpoint", str(run)]):
        assert main(["evaluate", *source, "--split", "valid"]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        lines[source[0]] = {k: v for k, v in line.items() if k[:2] in ("hr", "nd", "mr", "nu")}
    assert lines["--model"] == lines["--checkpoint"] and lines["--model"]["num_examples"] == 610
