"""Tiny GPT recommenders end to end in one process with a plain torch optimizer."""

from __future__ import annotations

import hashlib
import json
import pickle
from unittest import mock

import pytest
import torch

from configs import ConfigError, load_config
from modeling.collate import PromptSpec, first_item_token_id, make_collate
from modeling.factory import build_model_and_tokenizer, load_model_for_eval, train_tokenizer
from modeling.loss import LossComputer, task_loss
from modeling.metrics import compute_metrics, concat_outputs, eval_outputs

NUM_ITEMS = 24
LEVELS = [0.5 * i for i in range(1, 11)]


def _items() -> list[dict]:
    words = ["Toy", "Story", "Heat", "Casino", "Sabrina", "Jumanji", "Balto", "Nixon"]
    return [
        {
            "index": i,
            "item_id": str(100 + i),
            "title": f"{words[i % 8]} {words[(i * 3) % 8]} ({1990 + i})" if i % 7 else "",
            "count": 1,
        }
        for i in range(NUM_ITEMS)
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A shard directory holding only what the modeling factory reads: manifest + item vocabulary."""
    return vocabulary_shards(tmp_path_factory.mktemp("shards"))


def vocabulary_shards(d):
    """Write the manifest and item vocabulary of :func:`_items` into directory ``d``; returns ``d``."""
    data = "\n".join(json.dumps(it) for it in _items()).encode() + b"\n"
    (d / "items.jsonl").write_bytes(data)
    manifest = {
        "format_version": 1,
        "fingerprint": "test",
        "num_items": NUM_ITEMS,
        "num_users": 8,
        "splits": {},
        "items_file": "items.jsonl",
        "items_sha256": hashlib.sha256(data).hexdigest(),
        "rating_levels": LEVELS,
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def _cfg(*overrides: str):
    shape = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2"]
    if "model.preset=null" in overrides:  # a loaded model has its own shape
        shape = ["model.n_layer=null", "model.n_embd=null", "model.n_head=null"]
    base = shape + ["model.tokenizer_vocab_size=300", "model.dropout=0.0"]
    return load_config(None, base + list(overrides))


def _collate(cfg, tok, items, split):
    """The collate of ``split`` for ``cfg`` (shard window 50 unless data.max_history says less)."""
    return make_collate(PromptSpec.from_config(cfg, cfg.data.max_history or 50), tok, items, split)


def _records(n_users: int = 6, length: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for u in range(n_users):
        items = torch.randperm(NUM_ITEMS, generator=g)[:length].tolist()
        ratings = [LEVELS[int(x)] for x in torch.randint(0, 10, (length,), generator=g)]
        out.append(
            {"user": f"u{u}", "uid": u, "items": items, "ratings": ratings, "timestamps": list(range(length))}
        )
    return out


def _eval_records(records: list[dict]) -> list[dict]:
    return [{**r, "seen": r["items"][:-1]} for r in records]


# --------------------------------------------------------------------------- collate


@pytest.mark.parametrize("prompt", ["ids", "text"])
def test_collate_formats(shards, prompt):
    cfg = _cfg(f"model.prompt={prompt}", "data.max_history=4")
    model, tok = build_model_and_tokenizer(cfg, shards)
    items = _items()
    recs = _records(3, 8)
    train = pickle.loads(pickle.dumps(_collate(cfg, tok, items, "train")))  # runs in DataLoader workers
    b = train(recs)
    assert set(b) == {"input_ids", "attention_mask", "labels", "ratings"}
    # A window of max_history + 1 items: every input entry but none of the dropped old ones is labelled.
    for row, r in zip(b["labels"], recs):
        assert row[row != -100].tolist() == r["items"][-4:]
    ids = b["input_ids"][0][b["attention_mask"][0].bool()].tolist()
    assert ids[0] == tok.bos_token_id
    if prompt == "ids":
        assert ids[1:] == model.item_token_ids[recs[0]["items"][-5:-1]].tolist()
    else:
        text = tok.decode(ids[1:])
        assert text.startswith("User rated:") and text.count("/5;") == 4

    ev = _collate(cfg, tok, items, "valid")
    erecs = _eval_records(recs)
    erecs[2] = {**erecs[2], "pad": True}
    e = ev(erecs)
    assert e["valid"].tolist() == [True, True, False]
    assert e["target"].tolist() == [r["items"][-1] for r in recs]
    assert ((e["labels"] != -100).sum(1) == 1).all()
    assert e["seen"].shape == (3, 7) and e["seen"][0].tolist() == recs[0]["items"][:-1]

    last = _collate(_cfg(f"model.prompt={prompt}", "train.objective=last"), tok, items, "train")(recs)
    assert ((last["labels"] != -100).sum(1) == 1).all()


def test_collate_fits_the_context_and_names_bad_records(shards):
    cfg = _cfg("model.prompt=text", "data.max_history=50")
    _, tok = build_model_and_tokenizer(cfg, shards)
    tok.model_max_length = 40
    collate = _collate(cfg, tok, _items(), "train")
    b = collate(_records(2, 20))
    assert b["input_ids"].shape[1] <= 40 and (b["labels"] != -100).any(1).all()
    with pytest.raises(ValueError, match="user 'u0'.*rating 3.3"):
        collate([{**_records(1)[0], "ratings": [3.3] * 8}])


# --------------------------------------------------------------------------- loss and gradients


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("method,checkpointing", [("fgm", False), ("pgd", True)])
def test_adversarial_gradient_matches_hand_computed_reference(shards, method, checkpointing):
    eps, w = 0.7, 0.5
    cfg = _cfg(
        f"adversarial.method={method}",
        f"model.gradient_checkpointing={checkpointing}",
        f"adversarial.epsilon={eps}",
        f"adversarial.adv_weight={w}",
        "adversarial.steps=2",
        "adversarial.alpha=0.4",
        "adversarial.warmup_steps=3",
    )
    model, tok = build_model_and_tokenizer(cfg, shards)
    batch = _collate(cfg, tok, _items(), "train")(_records(4, 6))
    mask = batch["attention_mask"]

    def loss_of(embeds):
        return task_loss(model, model(attention_mask=mask, inputs_embeds=embeds), batch, cfg)

    # Reference, step by step: the perturbation is a constant found from gradients w.r.t. the embeddings.
    def direction(x):
        x = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(loss_of(x), x)
        g = g * mask[..., None]
        return g / g.flatten(1).norm(dim=1).view(-1, 1, 1)

    def to_ball(d):
        n = (d * mask[..., None]).flatten(1).norm(dim=1).view(-1, 1, 1)
        return d * mask[..., None] * torch.clamp(eps / n, max=1.0)

    e0 = model.embed(batch["input_ids"]).detach()
    if method == "fgm":
        r = eps * direction(e0)
    else:
        r = to_ball(0.4 * direction(e0))
        r = to_ball(r + 0.4 * direction(e0 + r))
    clean_grads = torch.autograd.grad(loss_of(model.embed(batch["input_ids"])), _params(model))
    adv_grads = torch.autograd.grad(loss_of(model.embed(batch["input_ids"]) + r), _params(model))
    reference = [c + w * a for c, a in zip(clean_grads, adv_grads)]

    loss, logs = LossComputer(cfg)(model, batch, step=3)
    loss.backward()
    for p, ref in zip(_params(model), reference):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)
    assert logs["perturbation_norm"] == pytest.approx(
        float((r * mask[..., None]).flatten(1).norm(dim=1).mean()), rel=1e-4
    )
    assert logs["loss"] == pytest.approx(logs["clean_loss"] + w * logs["adv_loss"], rel=1e-5)

    # Warm-up: no perturbation before step `warmup_steps`.
    clean, logs = LossComputer(cfg)(model, batch, step=2)
    assert logs["adv_loss"] == 0.0 and logs["perturbation_norm"] == 0.0
    assert float(clean.detach()) == pytest.approx(logs["clean_loss"])


def test_sampled_softmax_over_every_item_equals_full_softmax(shards):
    cfg = _cfg("train.loss=sampled")
    model, tok = build_model_and_tokenizer(cfg, shards)
    batch = _collate(cfg, tok, _items(), "train")(_records(3))
    hidden = model(attention_mask=batch["attention_mask"], input_ids=batch["input_ids"])
    full = task_loss(model, hidden, batch, cfg)
    sampled = task_loss(model, hidden, batch, cfg, negatives=torch.arange(NUM_ITEMS).flip(0))
    torch.testing.assert_close(full, sampled)
    fewer = task_loss(model, hidden, batch, cfg, negatives=torch.tensor([0, 1]))
    assert float(fewer.detach()) < float(full.detach())
    loss, _ = LossComputer(cfg)(model, batch, step=0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    "overrides",
    [[], ["train.loss=sampled"], ["train.loss=gbce", "train.num_negatives=16"], ["task=rating", "eval.metric=accuracy"],
     ["task=rating", "eval.metric=accuracy", "model.rating_head=regression"]],
)  # fmt: skip
def test_loss_is_the_sum_over_supervised_positions_over_the_denominator(shards, overrides):
    """The training loop weighs every position of an optimizer step by 1/N (``denominator``); alone the
    loss is the mean over the batch's supervised positions; a batch without any contributes 0, not NaN."""
    from modeling.loss import step_denominator, supervised_positions

    cfg = _cfg(*overrides)
    model, tok = build_model_and_tokenizer(cfg, shards)
    batch = _collate(cfg, tok, _items(), "train")(_records(3, 7))
    n = supervised_positions(batch)
    assert n == int((batch["labels"] != -100).sum()) > 0
    loss_fn = LossComputer(cfg)
    torch.manual_seed(0)  # sampled negatives: the same draw for both
    mean, logs = loss_fn(model, batch, step=0)
    torch.manual_seed(0)
    scaled, scaled_logs = loss_fn(model, batch, step=0, denominator=step_denominator(5 * n, 2, 2))
    assert float(scaled.detach()) == pytest.approx(float(mean.detach()) * 4 / 5, rel=1e-6)
    assert scaled_logs["loss"] == pytest.approx(logs["loss"] * 4 / 5, rel=1e-6)
    assert step_denominator(0, 2, 2) == 0.25  # a step without labels: losses 0, never 0/0
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    empty, _ = loss_fn(model, unlabelled, step=0)
    assert float(empty.detach()) == 0.0


# --------------------------------------------------------------------------- training


def _train(model, cfg, batch, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW(_params(model), lr=lr, weight_decay=0.0)
    loss_fn = LossComputer(cfg)
    model.train()
    losses = []
    for step in range(steps):
        loss, logs = loss_fn(model, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["loss"])
    return losses


def test_tiny_model_overfits_to_hr1_with_adversarial_training(shards):
    cfg = _cfg(
        "eval.ks=[1,5]",
        "eval.metric=hr@1",
        "adversarial.method=freelb",
        "adversarial.warmup_steps=20",
        "adversarial.epsilon=0.05",
        "adversarial.steps=2",
        "adversarial.eval_epsilon=0.05",
        "model.n_embd=64",
    )
    torch.manual_seed(0)
    model, tok = build_model_and_tokenizer(cfg, shards)
    recs = _records(6, 8)
    batch = _collate(cfg, tok, _items(), "train")(recs)
    losses = _train(model, cfg, batch, steps=80, lr=1e-2)
    assert losses[-1] < 0.1 * losses[0]
    model.eval()
    ev = _collate(cfg, tok, _items(), "valid")
    # Eval records = the same sequences; without exclude_seen masking every target is in the top 1.
    outs = [eval_outputs(model, ev(_eval_records(recs)[i : i + 3]), cfg, attack_epsilon=0.05) for i in (0, 3)]
    metrics = compute_metrics(concat_outputs(outs), cfg)
    assert metrics["hr@1"] == 1.0 and metrics["ndcg@1"] == 1.0 and metrics["num_examples"] == 6
    assert 0.0 <= metrics["robust_hr@5"] <= 1.0


@pytest.mark.parametrize("head", ["classes", "regression"])
def test_rating_task_trains_and_evaluates(shards, head):
    cfg = _cfg(
        "task=rating",
        "eval.metric=accuracy",
        f"model.rating_head={head}",
        "model.prompt=text",
        "adversarial.method=fgm",
        "adversarial.warmup_steps=0",
        "adversarial.epsilon=0.05",
    )
    model, tok = build_model_and_tokenizer(cfg, shards)
    recs = _records(4, 6)
    batch = _collate(cfg, tok, _items(), "train")(recs)
    assert (batch["labels"] != -100).sum() == 4 * 6  # every item's rating is supervised
    losses = _train(model, cfg, batch, steps=30, lr=1e-2)
    assert losses[-1] < losses[0]
    model.eval()
    ev = _collate(cfg, tok, _items(), "test")(_eval_records(recs))
    out = eval_outputs(model, ev, cfg, attack_epsilon=0.1)
    assert out["rating"].tolist() == [r["ratings"][-1] for r in recs]
    m = compute_metrics(out, cfg)
    assert {"accuracy", "rmse", "neg_rmse", "auc", "robust_accuracy", "robust_rmse"} <= set(m)
    assert 0 <= m["accuracy"] <= 1 and m["rmse"] >= 0


# --------------------------------------------------------------------------- LoRA and reloading


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lora_freezes_base_weights_and_trains_item_rows_and_head(shards, tmp_path):
    # LoRA starts from a trained base: an HF directory with an UNTIED head (Llama-style), built here.
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_tokenizer(_items(), LEVELS, 300)
    base = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_layer=2,
            n_embd=32,
            n_head=2,
            n_positions=256,
            tie_word_embeddings=False,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    )
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cfg = _cfg(
        "model.preset=null", f"model.name_or_path={tmp_path / 'base'}", "lora.enabled=true", "lora.r=4"
    )
    model, tok = build_model_and_tokenizer(cfg, shards)
    assert not model.tied
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any("trainable_tokens" in n for n in names)
    before = _snapshot(model)
    item_ids = model.item_token_ids
    with torch.no_grad():
        head_items = model.causal_lm.get_output_embeddings()(torch.eye(32))[:, item_ids].clone()
        emb_items = model.embed(item_ids).clone()
        emb_other = model.embed(torch.arange(10)).clone()
    batch = _collate(cfg, tok, _items(), "train")(_records(4))
    _train(model, cfg, batch, steps=3, lr=1e-2)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    with torch.no_grad():
        assert not torch.allclose(model.embed(item_ids), emb_items)
        assert not torch.allclose(
            model.causal_lm.get_output_embeddings()(torch.eye(32))[:, item_ids], head_items
        )
        assert torch.equal(model.embed(torch.arange(10)), emb_other)


def test_lora_on_tied_preset_trains_item_rows(shards):
    cfg = _cfg("lora.enabled=true")
    model, tok = build_model_and_tokenizer(cfg, shards)
    assert model.tied
    with torch.no_grad():
        rows = model.embed(model.item_token_ids).clone()
    _train(model, cfg, _collate(cfg, tok, _items(), "train")(_records(3)), steps=2, lr=1e-2)
    with torch.no_grad():
        assert not torch.allclose(model.embed(model.item_token_ids), rows)


def test_adalora_builds_and_reallocates(shards):
    from modeling.lora import adalora_update

    cfg = _cfg("lora.enabled=true", "lora.method=adalora", "train.max_steps=20")
    model, tok = build_model_and_tokenizer(cfg, shards)
    batch = _collate(cfg, tok, _items(), "train")(_records(2))
    loss, _ = LossComputer(cfg)(model, batch, step=0)
    loss.backward()
    adalora_update(model, 0)  # reads .grad: between backward and the optimizer step


def _tiny_llama(tmp_path, tok):
    """A tiny Llama (untied head, RMSNorm, rotary positions) saved as an HF directory with ``tok``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


@pytest.mark.parametrize("arch", ["gpt2", "bart", "ligr", "llama"])
@pytest.mark.parametrize("n", [0, 1])
def test_freeze_trains_only_the_top_blocks_item_rows_and_heads(shards, tmp_path, arch, n):
    """model.trainable_layers=N: exactly the top N blocks (BART's cross-attention excepted) and the item
    rows of the embeddings and of an untied head (PEFT trainable tokens) train; every other weight is
    bit-identical after steps, every trainable one moved."""
    from modeling.lora import decoder_blocks

    if arch == "llama":
        path = _tiny_llama(tmp_path, train_tokenizer(_items(), LEVELS, 300))
        over = ["model.preset=null", f"model.name_or_path={path}"]
    else:
        over = [f"model.architecture={arch}"]
    cfg = _cfg(*over, f"model.trainable_layers={n}")
    model, tok = build_model_and_tokenizer(cfg, shards)
    blocks = decoder_blocks(model.causal_lm)
    assert len(blocks) == (3 if arch == "llama" else 2) and model.tied == (arch != "llama")
    top = {id(p) for b in list(blocks)[len(blocks) - n :] for p in b.parameters()}
    trainable = {n_ for n_, p in model.named_parameters() if p.requires_grad}
    expected = {
        n_
        for n_, p in model.named_parameters()
        if (id(p) in top and ".encoder_attn" not in n_) or "trainable_tokens_delta" in n_
    }
    assert trainable == expected
    tokens = [n_ for n_ in trainable if "trainable_tokens_delta" in n_]
    assert len(tokens) == (2 if arch == "llama" else 1)  # an untied head gets its own item rows
    assert (n == 0) == all("trainable_tokens" in n_ for n_ in trainable)

    before = _snapshot(model)
    item_ids = model.item_token_ids
    with torch.no_grad():
        emb_items, emb_other = model.embed(item_ids).clone(), model.embed(torch.arange(10)).clone()
    batch = _collate(cfg, tok, _items(), "train")(_records(4))
    _train(model, cfg, batch, steps=3, lr=1e-2)
    for name, p in model.named_parameters():
        same = torch.equal(p, before[name])
        assert same == (name not in trainable), f"{name}: {'frozen but changed' if not same else 'unchanged'}"
    with torch.no_grad():
        assert not torch.allclose(model.embed(item_ids), emb_items)
        assert torch.equal(model.embed(torch.arange(10)), emb_other)


def test_freeze_refuses_more_layers_than_the_model_has_and_lora(shards):
    # A preset's depth is known to the schema: refused with the config, before any model is built (a
    # model directory's by modeling.factory.check_trainable_layers, tests/test_tune.py).
    with pytest.raises(ConfigError, match=r"^model.trainable_layers: got 3, but the model has 2 layers"):
        _cfg("model.trainable_layers=3")
    with pytest.raises(ConfigError, match=r"^model.trainable_layers: freeze tuning and lora.enabled"):
        _cfg("model.trainable_layers=1", "lora.enabled=true")
    with pytest.raises(ConfigError, match=r"^model.trainable_layers: got -1, must be >= 0"):
        _cfg("model.trainable_layers=-1")


def test_rebuild_from_saved_tokenizer_reproduces_the_model(shards, tmp_path):
    cfg = _cfg("model.prompt=text", "model.item_init=title")
    model, tok = build_model_and_tokenizer(cfg, shards)
    tok.save_pretrained(tmp_path / "tokenizer")
    again, tok2 = load_model_for_eval(cfg, tmp_path / "tokenizer", shards)
    assert len(tok2) == len(tok) and tok2.init_kwargs["recgpt_rating_levels"] == LEVELS
    again.load_state_dict(model.state_dict())
    model.eval()
    batch = _collate(cfg, tok2, _items(), "valid")(_eval_records(_records(2)))
    a, b = eval_outputs(model, batch, cfg), eval_outputs(again, batch, cfg)
    assert torch.equal(a["rank"], b["rank"])
    # An HF directory that already has the item tokens (a recgpt export) is loaded without adding more.
    model.causal_lm.save_pretrained(tmp_path / "export")
    tok.save_pretrained(tmp_path / "export")
    exported, tok3 = build_model_and_tokenizer(
        _cfg("model.preset=null", f"model.name_or_path={tmp_path / 'export'}"), shards
    )
    assert len(tok3) == len(tok) and torch.equal(exported.item_token_ids, model.item_token_ids)
    torch.testing.assert_close(
        exported.eval()(batch["input_ids"], batch["attention_mask"]),
        model(batch["input_ids"], batch["attention_mask"]),
    )


def test_objective_new_labels_only_the_new_targets(shards):
    cfg = _cfg("train.objective=new", "data.max_history=5")
    _, tok = build_model_and_tokenizer(cfg, shards)
    rec = {**_records(1, 8)[0], "first_new_target": 4}
    labels = _collate(cfg, tok, _items(), "train")([rec])["labels"][0]
    # max_history=5 keeps the newest 6 items (2 dropped): new targets are items 4.. of the record.
    assert labels[labels != -100].tolist() == rec["items"][4:]
    every = _collate(_cfg("data.max_history=5"), tok, _items(), "train")([rec])["labels"][0]
    assert every[every != -100].tolist() == rec["items"][3:]


def test_bart_preset_is_a_post_ln_decoder_without_trainable_cross_attention(shards):
    cfg = _cfg("model.architecture=bart")
    model, tok = build_model_and_tokenizer(cfg, shards)
    assert type(model.causal_lm).__name__ == "BartForCausalLM" and model.tied
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".encoder_attn" in n for n in frozen)
    # Plain transformers' default forward (KV cache on) sizes the cache by num_hidden_layers: it must be
    # the decoder's depth, or a serving engineer's first model(ids) fails (an exported BART layout).
    lm = model.causal_lm
    assert lm.config.num_hidden_layers == lm.config.decoder_layers == 2
    lm.config.use_cache = True
    with torch.no_grad():
        out = lm.eval()(input_ids=torch.tensor([[tok.bos_token_id, first_item_token_id(tok) + 3]]))
    assert out.past_key_values is not None and out.logits.shape[:2] == (1, 2)
    lm.config.use_cache = False
    model.train()
    batch = _collate(cfg, tok, _items(), "train")(_records(3))
    losses = _train(model, cfg, batch, steps=30, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    lora, _ = build_model_and_tokenizer(_cfg("model.architecture=bart", "lora.enabled=true"), shards)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in lora.named_parameters() if ".lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert not any(".encoder_attn" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_cooccurrence_init_puts_co_rated_items_together(sample_shards):
    from modeling.factory import cooccurrence_embeddings

    vectors = cooccurrence_embeddings(_cfg(), sample_shards, 9724, 32)
    assert vectors.shape == (9724, 32) and torch.isfinite(vectors).all()
    # Toy Story (index 0 in the sample's item order) and Toy Story 2 (2353) are rated close together
    # by many users: the sequel is among the original's nearest neighbours out of 9,724 items.
    unit = torch.nn.functional.normalize(vectors, dim=1)
    sims = unit @ unit[0]
    assert int((sims > sims[2353]).sum()) <= 100


@pytest.mark.parametrize("arch", ["gpt2", "bart", "ligr"])
def test_length_groups_give_the_single_call_hidden_states_and_gradients(shards, arch):
    """Rows run at their own group's width (most of a recommendation batch is padding): the hidden
    states of real positions and every gradient match one call at the batch width."""
    from modeling.model import length_groups

    cfg = _cfg(f"model.architecture={arch}")
    model, tok = build_model_and_tokenizer(cfg, shards)
    model.eval()  # no dropout: the two paths draw their masks differently
    records = [r for n in (2, 3, 5, 9, 17, 40) for r in _records(4, length=min(n, NUM_ITEMS), seed=n)]
    for i, r in enumerate(records):
        r["user"], r["uid"] = f"u{i}", i
    batch = _collate(cfg, tok, _items(), "train")(records)
    mask = batch["attention_mask"]
    groups = length_groups(mask)
    assert groups is not None and len(groups) >= 3
    assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(len(records)))
    assert all(int(mask[rows].sum(1).max()) == width for rows, width in groups)

    def run(grouped: bool):
        model.zero_grad()
        embeds = model.embed(batch["input_ids"]).detach().requires_grad_(True)
        if grouped:
            hidden = model(attention_mask=mask, inputs_embeds=embeds)
        else:
            hidden = model._body(embeds, mask)
        real = hidden[mask.bool()]
        (real * torch.linspace(-1, 1, real.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return real.detach(), embeds.grad[mask.bool()], grads

    h1, e1, g1 = run(True)
    h0, e0, g0 = run(False)
    torch.testing.assert_close(h1, h0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-4)
    assert g1.keys() == g0.keys() and g1
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)
    # Left padding, holes or little to save: one call as before.
    assert length_groups(mask.flip(1)) is None
    assert length_groups(torch.ones(4, 30, dtype=torch.long)) is None


def test_item_tokens_are_ids_past_the_tokenizer_and_legacy_tokenizers_still_load(tmp_path):
    """A catalogue adds ids, not token strings: the saved tokenizer is the same size for 24 or 200,000
    items (an HF tokenizer with 1M added tokens takes about a minute and 3.6 GB to load). Tokenizers
    saved with ``<item_i>`` added tokens (before) still give their item ids."""
    from transformers import AutoTokenizer

    from modeling.collate import first_item_token_id
    from modeling.factory import item_token, model_vocab_size, reserve_item_tokens

    sizes = {}
    for n in (24, 200_000):
        tok = train_tokenizer(_items(), LEVELS, 300)
        items = [{"index": i, "item_id": str(i), "title": ""} for i in range(n)]
        first, added = reserve_item_tokens(tok, items, LEVELS, "test")
        assert added and first == len(tok) and model_vocab_size(tok) == first + n
        tok.save_pretrained(tmp_path / str(n))
        sizes[n] = (tmp_path / str(n) / "tokenizer.json").stat().st_size
        again = AutoTokenizer.from_pretrained(tmp_path / str(n))
        assert first_item_token_id(again) == first and model_vocab_size(again) == first + n
        assert reserve_item_tokens(again, items, LEVELS, "saved") == (first, False)
        with pytest.raises(ConfigError, match="another item vocabulary"):
            reserve_item_tokens(again, items[:-1], LEVELS, "saved")
    assert sizes[24] == sizes[200_000]

    legacy = train_tokenizer(_items(), LEVELS, 300)
    legacy.add_tokens([item_token(i) for i in range(NUM_ITEMS)], special_tokens=True)
    legacy.save_pretrained(tmp_path / "legacy")
    legacy = AutoTokenizer.from_pretrained(tmp_path / "legacy")
    want = legacy.convert_tokens_to_ids(item_token(0))
    assert first_item_token_id(legacy) == want
    assert reserve_item_tokens(legacy, _items(), LEVELS, "legacy") == (want, False)
    assert model_vocab_size(legacy) == len(legacy) == want + NUM_ITEMS
    with pytest.raises(ValueError, match="no item token ids"):
        first_item_token_id(train_tokenizer(_items(), LEVELS, 300))


@pytest.mark.parametrize("arch", ["gpt2", "bart"])
def test_item_rows_as_a_slice_give_the_gathered_scores_and_gradients(shards, arch):
    """Full ranking and its chunks read the item rows as a view of the embedding matrix (the item ids are
    one contiguous range), not a gather copying them: the same scores and gradients, bit for bit."""
    import modeling.model as mm

    cfg = _cfg(f"model.architecture={arch}")
    model, _ = build_model_and_tokenizer(cfg, shards)
    assert model._item_range is not None and model._item_range[1] - model._item_range[0] == NUM_ITEMS
    h = torch.randn(5, model.causal_lm.config.hidden_size)

    def scores_and_grad(items):
        model.zero_grad()
        out = model.item_logits(h, items=items)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), model.causal_lm.get_input_embeddings().weight.grad.clone()

    sliced = scores_and_grad(None), scores_and_grad(slice(2, 7))
    with mock.patch.object(mm, "_whole_embedding", lambda module: False):  # the gather path
        gathered = scores_and_grad(None), scores_and_grad(torch.arange(2, 7))
    for (s1, g1), (s0, g0) in zip(sliced, gathered):
        assert torch.equal(s1, s0) and torch.equal(g1, g0)
    assert sliced[1][0].shape == (5, 5)
