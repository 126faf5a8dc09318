"""Build the recommender (RecModel) and its tokenizer from the config and the shard vocabulary.

* ``model.preset`` (tiny/small/base): a decoder-only transformer with random weights, in the GPT-2
  block layout (pre-LN, ``model.architecture=gpt2``), the SASRec/BART one (post-LN with LayerNorm on
  the embeddings, built from Hugging Face's BART decoder, ``bart``) or eSASRec's gated LiGR blocks
  (``ligr``, :mod:`modeling.ligr`), and a byte-level BPE tokenizer trained here on the item titles —
  nothing is downloaded.
* ``model.name_or_path``: any HF causal LM (local directory, a recgpt export included, or hub name)
  through the Auto classes.

Then one token id per item, contiguous past the tokenizer's own ids (:func:`reserve_item_tokens`: ids,
not added token strings, so a million items cost nothing to save or load), embeddings resized, the new
rows initialised (``model.item_init``), optional non-reentrant gradient checkpointing, optional LoRA or
freeze tuning (``model.trainable_layers``).
The tokenizer carries ``recgpt_first_item_token_id`` / ``recgpt_num_items`` / ``recgpt_items_sha256`` /
``recgpt_rating_levels`` in its ``init_kwargs`` so that a saved tokenizer directory describes the item
vocabulary it was built for.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BartConfig,
    BartForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from configs import ConfigError, RecGPTConfig
from modeling.collate import (
    FIRST_ITEM_KEY,
    RATING_LEVELS_KEY,
    TEXT_PREFIX,
    first_item_token_id,
    item_title,
    rating_text,
)
from modeling.ligr import LiGRConfig, LiGRForCausalLM
from modeling.lora import apply_freeze, apply_lora, trainable_parameters
from modeling.model import RecModel, is_tied
from modeling.warm_start import WarmStart, base_tokenizer, load_warm_weights

log = logging.getLogger("recgpt.modeling")

EOS = "<|endoftext|>"
NUM_ITEMS_KEY = "recgpt_num_items"
ITEMS_SHA_KEY = "recgpt_items_sha256"
PRESET_CONTEXT = 1024


def item_token(index: int) -> str:
    """The legacy added-token string of item ``index`` (tokenizers saved before ids-only item tokens)."""
    return f"<item_{index}>"


# --------------------------------------------------------------------------- shard vocabulary


def read_vocabulary(shards_dir: str | os.PathLike) -> tuple[dict[str, Any], list[dict]]:
    """(manifest, items) of a shard directory, via data_shards' reader of the two files."""
    from data_shards.manifest import load_manifest, read_items

    manifest = load_manifest(shards_dir)
    return manifest, read_items(shards_dir, manifest)


# --------------------------------------------------------------------------- tokenizer


TOKENIZER_TITLES = 100_000
"""At most this many item titles train the BPE (catalogues up to it: every title)."""


def train_tokenizer(
    items: list[dict], rating_levels: list[float], vocab_size: int
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the item titles (at most ``TOKENIZER_TITLES``) and the prompt words
    (GPT-2 style, one special token that is BOS, EOS and PAD at once so config, generation config and
    tokenizer cannot disagree)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    top = max(rating_levels, default=5.0)
    # A vocabulary of a few thousand pieces is learned from far fewer titles than a large catalogue has
    # (1M titles: ~60 s of BPE training): at most TOKENIZER_TITLES, evenly spaced by index.
    every = max(1, -(-len(items) // TOKENIZER_TITLES))
    corpus = [" " + item_title(it) for it in items[::every]] + [TEXT_PREFIX]
    corpus += [rating_text(r, top, p) for r in rating_levels for p in ("text", "ids")]
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def _items_sha(items: list[dict]) -> str:
    return hashlib.sha256("\n".join(str(it["item_id"]) for it in items).encode()).hexdigest()


def reserve_item_tokens(
    tokenizer, items: list[dict], rating_levels: list[float], source: str
) -> tuple[int, bool]:
    """Give every item a token id, contiguous from ``len(tokenizer)``; returns (the id of item 0, whether
    the ids are new). The ids are recorded in ``init_kwargs`` (:data:`FIRST_ITEM_KEY`), not added as
    token strings: the tokenizer file stays the base tokenizer's size whatever the catalogue.

    A tokenizer that already has them (a recgpt checkpoint or export; older ones as ``<item_i>`` added
    tokens) must have been built for the same item vocabulary (ConfigError otherwise)."""
    n = len(items)
    sha = _items_sha(items)
    try:
        first, had = first_item_token_id(tokenizer), True
    except ValueError:
        first, had = len(tokenizer), False
    if had:
        saved_n, saved_sha = (
            tokenizer.init_kwargs.get(NUM_ITEMS_KEY),
            tokenizer.init_kwargs.get(ITEMS_SHA_KEY),
        )
        if (saved_n is not None and saved_n != n) or (saved_sha is not None and saved_sha != sha):
            raise ConfigError(
                f"model.name_or_path: the tokenizer in {source} was built for another item vocabulary "
                f"({saved_n} items) than the shards ({n} items)"
            )
    if had and FIRST_ITEM_KEY not in tokenizer.init_kwargs:  # legacy <item_i> added tokens
        ids = tokenizer.convert_tokens_to_ids([item_token(i) for i in range(n)])
        if ids != list(range(first, first + n)):
            raise ConfigError(f"model.name_or_path: item tokens of {source} do not have contiguous ids")
    tokenizer.init_kwargs[FIRST_ITEM_KEY] = first
    tokenizer.init_kwargs[NUM_ITEMS_KEY] = n
    tokenizer.init_kwargs[ITEMS_SHA_KEY] = sha
    tokenizer.init_kwargs[RATING_LEVELS_KEY] = [float(r) for r in rating_levels]
    return first, not had


def model_vocab_size(tokenizer) -> int:
    """Rows the embedding matrix needs: the tokenizer's own tokens and the item ids past them."""
    return max(len(tokenizer), first_item_token_id(tokenizer) + int(tokenizer.init_kwargs[NUM_ITEMS_KEY]))


# --------------------------------------------------------------------------- model


def _preset_model(cfg: RecGPTConfig, tokenizer) -> PreTrainedModel:
    shape = cfg.model.shape()
    p = cfg.model.dropout
    if cfg.model.architecture == "ligr":
        # Importing modeling.ligr registered it with the Auto classes: its exports load through
        # AutoModelForCausalLM here (model.name_or_path, serving) and, without recgpt, through the copy of
        # modeling/ligr.py that save_pretrained puts beside the weights (auto_map).
        ligr = LiGRConfig(
            vocab_size=model_vocab_size(tokenizer),
            hidden_size=shape["n_embd"],
            num_hidden_layers=shape["n_layer"],
            num_attention_heads=shape["n_head"],
            intermediate_size=cfg.model.ffn_size(),
            max_position_embeddings=PRESET_CONTEXT,
            dropout=p,
            attention_dropout=p,
            activation_dropout=p,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        return LiGRForCausalLM._from_config(ligr)  # the constructor path that honours ZeRO-3
    if cfg.model.architecture == "bart":
        # BART's decoder alone is a causal LM: embeddings + positions -> LayerNorm -> post-LN blocks,
        # the layout of SASRec. It carries (unused, untrained) cross-attention weights.
        config = BartConfig(
            vocab_size=model_vocab_size(tokenizer),
            d_model=shape["n_embd"],
            decoder_layers=shape["n_layer"],
            decoder_attention_heads=shape["n_head"],
            decoder_ffn_dim=cfg.model.ffn_size(),
            # Never built (BartForCausalLM is the decoder alone), but config.num_hidden_layers reads it:
            # plain transformers sizes its KV cache by it, so it must be the decoder's depth.
            encoder_layers=shape["n_layer"],
            max_position_embeddings=PRESET_CONTEXT,
            dropout=p,
            attention_dropout=p,
            activation_dropout=0.0,
            activation_function="gelu",
            scale_embedding=False,
            init_std=0.02,
            is_decoder=True,
            is_encoder_decoder=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            decoder_start_token_id=tokenizer.bos_token_id,
            forced_eos_token_id=None,
            tie_word_embeddings=True,
        )
        lm = BartForCausalLM._from_config(config)
        for name, param in lm.named_parameters():
            if ".encoder_attn" in name:  # never runs without encoder states: keep it out of training
                param.requires_grad_(False)
        return lm
    config = GPT2Config(
        vocab_size=model_vocab_size(tokenizer),
        n_positions=PRESET_CONTEXT,
        resid_pdrop=p,
        embd_pdrop=p,
        attn_pdrop=p,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        n_inner=cfg.model.ffn_size(),
        **shape,
    )
    return GPT2LMHeadModel._from_config(config)  # the constructor path that honours ZeRO-3


@contextlib.contextmanager
def _zero3_context(ds_config: dict[str, Any] | None):
    """Under ZeRO-3, keep an ``HfDeepSpeedConfig`` alive while the model is built: transformers then
    creates the weights already partitioned (``deepspeed.zero.Init`` in ``_from_config`` and
    ``from_pretrained``, initialised gathered on rank 0) and resizes embeddings gathered, so no rank
    ever holds the whole model; PEFT gathers the item rows it copies the same way."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        del keep_alive


def _gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = 0):
    """Full tensors of ZeRO-3-partitioned parameters (a no-op for ordinary ones): for a modification
    made identically on every rank (``modifier_rank=0``: rank 0's result is kept) or reading (None)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _shape(weight: torch.nn.Parameter) -> torch.Size:
    """The full shape, also of a ZeRO-3 partition."""
    return weight.ds_shape if hasattr(weight, "ds_shape") else weight.shape


def _rows(weight: torch.nn.Parameter) -> int:
    return _shape(weight)[0]


def _cols(weight: torch.nn.Parameter) -> int:
    return _shape(weight)[1]


def cooccurrence_pmi(
    cfg: RecGPTConfig, shards_dir: str | os.PathLike, num_items: int, span: int = 5
) -> torch.Tensor:
    """Sparse [num_items, num_items] float32 COO matrix of the positive PMI of items rated within
    ``span`` positions of each other in the training split (symmetric; item2vec's implicit matrix)."""
    from modeling.data import build_loader

    pairs: dict[tuple[int, int], float] = {}
    from data_shards.manifest import load_manifest

    # Seed 0 and whole batches of 256, independent of the run's seed: the sample of windows counted
    # (all but the last partial batch) is the one every recgpt version has used, so runs stay comparable.
    # A split smaller than one batch is counted whole.
    whole = load_manifest(shards_dir)["splits"]["train"]["records"] < 256
    loader = build_loader(
        cfg, "train", shards=shards_dir, batch_size=256, num_workers=0, seed=0, drop_last=not whole
    )
    for batch in loader:
        for rec in batch:
            if rec.get("pad"):
                continue
            seq = rec["items"]
            # Count each pair once across overlapping windows: only pairs ending at a new target.
            for b in range(max(1, int(rec.get("first_new_target", 1))), len(seq)):
                for a in range(max(0, b - span), b):
                    key = (seq[a], seq[b]) if seq[a] < seq[b] else (seq[b], seq[a])
                    pairs[key] = pairs.get(key, 0.0) + 1.0
    idx = torch.tensor(list(pairs.keys()), dtype=torch.long).reshape(-1, 2).t()
    val = torch.tensor(list(pairs.values()), dtype=torch.float64)
    rows = torch.cat([idx[0], idx[1]])
    cols = torch.cat([idx[1], idx[0]])
    val = torch.cat([val, val])
    count = torch.zeros(num_items, dtype=torch.float64).index_add_(0, rows, val)
    pmi = torch.log(val * val.sum() / (count[rows] * count[cols]))
    keep = pmi > 0
    return torch.sparse_coo_tensor(
        torch.stack([rows[keep], cols[keep]]),
        pmi[keep].float(),
        (num_items, num_items),
        check_invariants=True,
    ).coalesce()


def cooccurrence_embeddings(
    cfg: RecGPTConfig, shards_dir: str | os.PathLike, num_items: int, dim: int, span: int = 5
) -> torch.Tensor:
    """Item vectors [num_items, dim] from the training split: a rank-``dim`` factorisation of
    :func:`cooccurrence_pmi`. Starting from them, the model does not spend its first epochs discovering
    which items go together."""
    m = cooccurrence_pmi(cfg, shards_dir, num_items, span)
    with torch.random.fork_rng(devices=[]):  # the same factors on every rank, the global stream untouched
        torch.manual_seed(0)
        u, s, _ = torch.svd_lowrank(m, q=dim, niter=4)
    return u * s.sqrt()


@torch.no_grad()
def init_item_rows(
    cfg: RecGPTConfig,
    lm: PreTrainedModel,
    tokenizer,
    items: list[dict],
    first_item: int,
    shards_dir: str | os.PathLike,
) -> None:
    """Initialise the (resized) item rows of the input embeddings and of an untied output head.

    ``mean``: mean of the pre-existing rows (plus noise of 0.1 x their std); ``title``: mean of the rows of the item title's tokens
    (falls back to the mean for an empty title); ``random``: normal with the existing rows' std;
    ``cooccurrence``: :func:`cooccurrence_embeddings` of the training split, scaled to the existing rows' std."""
    n, how = len(items), cfg.model.item_init
    mats = [lm.get_input_embeddings().weight]
    if not is_tied(lm):
        mats.append(lm.get_output_embeddings().weight)
    titles = (
        tokenizer([" " + item_title(it) for it in items], add_special_tokens=False)["input_ids"]
        if how == "title"
        else None
    )
    if how == "cooccurrence":
        vectors = cooccurrence_embeddings(cfg, shards_dir, n, _cols(mats[0]))
        vectors = vectors / vectors.std()
    for w in mats:
        with _gathered([w]):
            old = w[:first_item].float()
            mean = old.mean(0)
            if how == "random":
                rows = torch.randn(n, w.shape[1]) * old.std()
            elif how == "cooccurrence":
                # Noise keeps items that never co-occur (zero vectors) from tying.
                rows = (vectors + 0.1 * torch.randn(n, w.shape[1])) * old.std()
            elif how == "title":
                rows = torch.stack([old[torch.tensor(t)].mean(0) if t else mean for t in titles])
            else:
                # Identical rows would make every item score the same at first: a little noise breaks ties.
                rows = mean + 0.1 * old.std() * torch.randn(n, w.shape[1])
            w[first_item : first_item + n] = rows.to(w.dtype)


def sync_special_ids(lm: PreTrainedModel, tokenizer) -> None:
    """One set of BOS/EOS/PAD ids in tokenizer, config and generation config (else serving never stops)."""
    for c in (lm.config, getattr(lm, "generation_config", None)):
        if c is not None:
            c.bos_token_id, c.eos_token_id, c.pad_token_id = (
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
            )


def check_trainable_layers(cfg: RecGPTConfig) -> None:
    """Refuse ``model.trainable_layers`` above the block count of a local ``model.name_or_path`` from
    its ``config.json`` alone (no weights loaded), so a launcher can check a config before it starts
    workers. Presets are checked by the schema; a hub name is checked when the model is built.

    Raises :class:`ConfigError` naming the key."""
    n, path = cfg.model.trainable_layers, cfg.model.name_or_path
    if n is None or path is None or not os.path.isdir(path):
        return
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    # A decoder-only BART (recgpt's bart layout) counts decoder_layers; the others num_hidden_layers.
    blocks = getattr(hf, "decoder_layers", None) or getattr(hf, "num_hidden_layers", None)
    if isinstance(blocks, int) and n > blocks:
        raise ConfigError(f"model.trainable_layers: got {n}, but {path} has only {blocks} blocks")


def build_model_and_tokenizer(
    cfg: RecGPTConfig,
    shards_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    ds_config: dict[str, Any] | None = None,
    warm_start: WarmStart | None = None,
) -> tuple[RecModel, Any]:
    """RecModel + tokenizer for ``cfg`` and the item vocabulary of ``shards_dir``.

    ``tokenizer_dir``: rebuild around a saved tokenizer (checkpoint/export ``tokenizer/``) instead of
    training one / extending the pretrained one; weights are then expected to be loaded by the caller.
    ``ds_config``: the training run's DeepSpeed config; with ZeRO-3 the weights are built partitioned.
    ``warm_start`` (``train.init_from``): the weights of a trained model, item rows mapped by item id
    and new items' rows initialised by ``model.item_init`` (:mod:`modeling.warm_start`).
    """
    manifest, items = read_vocabulary(shards_dir)
    if cfg.task == "rating" and not manifest.get("rating_levels"):
        raise ConfigError(f"task: rating needs rating_levels in {shards_dir}/manifest.json")
    levels = [float(r) for r in manifest.get("rating_levels") or []]
    with _zero3_context(ds_config):
        lm, tokenizer, source = _build_lm(cfg, shards_dir, items, levels, tokenizer_dir, warm_start)
    first_item = first_item_token_id(tokenizer)
    tied = is_tied(lm)
    item_ids = torch.arange(first_item, first_item + len(items))
    # ZeRO-3 initialises the LM on rank 0 only: re-seed so adapters and heads start equal everywhere.
    torch.manual_seed(cfg.seed + 1)
    if cfg.lora.enabled or cfg.model.trainable_layers is not None:
        # PEFT copies the item rows into its trainable-token wrapper: give it the full matrices.
        heads = [lm.get_input_embeddings().weight] + ([] if tied else [lm.get_output_embeddings().weight])
        partial = apply_lora if cfg.lora.enabled else apply_freeze
        with _gathered(heads, modifier_rank=None):
            lm = partial(lm, cfg, item_ids.tolist(), tied=tied)
    model = RecModel(
        lm,
        item_ids,
        tied=tied,
        rating_levels=levels if cfg.task == "rating" else None,
        rating_head=cfg.model.rating_head,
    )
    if warm_start is not None and model.rating_head is not None and warm_start.rating_head is not None:
        same = (
            warm_start.config.task == "rating"
            and warm_start.rating_head["weight"].shape == model.rating_head.weight.shape
        )
        if not same:
            raise ConfigError(f"train.init_from: the rating head of {warm_start.source} does not fit "
                              f"this run's (rating levels {levels})")  # fmt: skip
        with torch.no_grad():
            model.rating_head.weight.copy_(warm_start.rating_head["weight"])
            model.rating_head.bias.copy_(warm_start.rating_head["bias"])
    trainable, total = trainable_parameters(model)
    log.info(
        "model %s: %d items, %d / %d parameters trainable (%.2f%%)",
        source,
        len(items),
        trainable,
        total,
        100 * trainable / total,
    )
    return model.train(), tokenizer  # from_pretrained returns eval mode: dropout would stay off


def _build_lm(
    cfg: RecGPTConfig,
    shards_dir: str | os.PathLike,
    items: list[dict],
    levels: list[float],
    tokenizer_dir: str | os.PathLike | None,
    warm_start: WarmStart | None = None,
) -> tuple[PreTrainedModel, Any, str]:
    """The causal LM with its item tokens added and initialised, its tokenizer, and a description."""
    m = cfg.model
    shape = m.shape()
    preset = (
        f"preset {m.preset} (decoder-only transformer, {m.architecture} block layout, "
        f"{shape['n_layer']} layers x {shape['n_embd']})"
    )
    source = str(tokenizer_dir or m.name_or_path or preset)
    if warm_start is not None:
        source = f"{source} warm-started from {warm_start.kind} {warm_start.source}"
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    elif warm_start is not None:  # the source's tokens keep their ids; item tokens are this run's
        tokenizer = base_tokenizer(warm_start.tokenizer_dir)
    elif m.preset is not None:
        tokenizer = train_tokenizer(items, levels, m.tokenizer_vocab_size)
    else:
        tokenizer = AutoTokenizer.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"model.name_or_path: the tokenizer of {source} has neither a pad nor an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    first_item, added = reserve_item_tokens(tokenizer, items, levels, source)

    if m.preset is not None:
        lm = _preset_model(cfg, tokenizer)
        tokenizer.model_max_length = PRESET_CONTEXT
    else:
        lm = AutoModelForCausalLM.from_pretrained(
            m.name_or_path, dtype=torch.float32, trust_remote_code=m.trust_remote_code
        )
        ctx = getattr(lm.config.get_text_config(), "max_position_embeddings", None)
        if ctx:
            tokenizer.model_max_length = min(tokenizer.model_max_length, ctx)
    # Some models already have spare rows past the tokenizer's size.
    if _rows(lm.get_input_embeddings().weight) < model_vocab_size(tokenizer):
        lm.resize_token_embeddings(model_vocab_size(tokenizer), mean_resizing=False)
    if warm_start is not None:
        counts = load_warm_weights(cfg, lm, tokenizer, items, first_item, shards_dir, warm_start)
        warm_start.info["items"] = {**counts, "item_init": m.item_init}
        log.info("warm start from %s: %d items kept, %d new (model.item_init=%s), %d dropped",
                 warm_start.source, counts["known"], counts["new"], m.item_init, counts["dropped"])  # fmt: skip
    elif added and tokenizer_dir is None:
        init_item_rows(cfg, lm, tokenizer, items, first_item, shards_dir)
    sync_special_ids(lm, tokenizer)
    lm.config.use_cache = False
    if m.gradient_checkpointing:
        # Non-reentrant: the adversarial step calls torch.autograd.grad, which reentrant checkpointing breaks.
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.24 name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return lm, tokenizer, source


def load_model_for_eval(
    cfg: RecGPTConfig, tokenizer_dir: str | os.PathLike, shards_dir: str | os.PathLike
) -> tuple[RecModel, Any]:
    """Skeleton of a trained model (same shapes and parameter names, LoRA wrapping included) around its
    saved tokenizer, in eval mode; the caller loads the weights (DeepSpeed checkpoint or state dict)."""
    if not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        raise ConfigError(f"{tokenizer_dir}: no saved tokenizer (tokenizer_config.json) there")
    model, tokenizer = build_model_and_tokenizer(cfg, shards_dir, tokenizer_dir=tokenizer_dir)
    return model.eval(), tokenizer
