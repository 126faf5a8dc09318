"""Warm starts (``train.init_from``): a new model whose weights come from a trained one, item rows by id.

The trainer side (``trainer.warm_start``) reads the source — an export directory or a checkpoint —
into a :class:`WarmStart`: the plain (LoRA merged) Hugging Face LM weights, the source's tokenizer and
its item vocabulary. The factory (``modeling.factory``) then builds the model of this run around the
source's tokenizer *without* its item tokens plus one ``<item_i>`` token per item of this run's shards,
and :func:`load_warm_weights` copies every weight:

* every non-item weight as it is (the model must have the source's architecture and shape);
* the embedding (and an untied output head) row of each item **known to the source, by item id**:
  the source's row of the same ``item_id``, wherever either vocabulary puts it;
* rows of items new to this run by ``model.item_init``: ``mean`` (of the known items' rows, plus noise
  of 0.1 x their std), ``cooccurrence`` (the positive-PMI-weighted mean of the rows of the known items
  a new item co-occurs with in this run's training split; the mean when it co-occurs with none),
  ``title`` (mean of its title tokens' rows) or ``random`` (normal with the known rows' std).

Optimizer, schedule and step start fresh: this is a new run, not a resume.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from configs import ConfigError, RecGPTConfig

ITEM_TOKEN = re.compile(r"<item_\d+>")


@dataclass
class WarmStart:
    """A trained model to start from (built by ``trainer.warm_start.load_source``)."""

    source: str
    """The export or checkpoint directory, as given."""
    kind: str
    """export or checkpoint."""
    config: RecGPTConfig
    """The source's resolved training config."""
    state: dict[str, torch.Tensor]
    """Plain Hugging Face LM weights (LoRA merged), fp32 on CPU, keyed as ``lm.state_dict()``."""
    tokenizer_dir: Path
    """The source's saved tokenizer (with its ``<item_i>`` tokens)."""
    items: list[dict]
    """The source's item vocabulary (index order; ``item_id`` per row)."""
    first_item: int
    """Token id of the source's ``<item_0>`` (its rows start there)."""
    rating_head: dict[str, torch.Tensor] | None = None
    """weight/bias of the source's rating head (task=rating), else None."""
    info: dict[str, Any] = field(default_factory=dict)
    """What the run records about its source (step, data fingerprint, ...)."""


def base_tokenizer(tokenizer_dir: str | os.PathLike):
    """The tokenizer saved in ``tokenizer_dir`` without its ``<item_i>`` tokens (and the recgpt
    vocabulary keys): the one the source's item tokens were added to, so every other token keeps its id."""
    from transformers import AutoTokenizer

    src = Path(tokenizer_dir)
    with tempfile.TemporaryDirectory(prefix="recgpt-tokenizer-") as tmp:
        for f in src.iterdir():
            if f.is_file():
                (Path(tmp) / f.name).write_bytes(f.read_bytes())
        path = Path(tmp) / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"train.init_from: {src} has no tokenizer.json (a fast tokenizer is needed)")
        data = json.loads(path.read_text())
        data["added_tokens"] = [
            t for t in data.get("added_tokens", []) if not ITEM_TOKEN.fullmatch(t["content"])
        ]
        path.write_text(json.dumps(data, ensure_ascii=False))
        config_path = Path(tmp) / "tokenizer_config.json"
        if config_path.is_file():
            conf = json.loads(config_path.read_text())
            conf = {k: v for k, v in conf.items() if not k.startswith("recgpt_")}
            decoder = conf.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                conf["added_tokens_decoder"] = {
                    k: v for k, v in decoder.items() if not ITEM_TOKEN.fullmatch(str(v.get("content", "")))
                }
            config_path.write_text(json.dumps(conf, ensure_ascii=False))
        return AutoTokenizer.from_pretrained(tmp)


def item_mapping(source_items: list[dict], items: list[dict]) -> tuple[list[int], list[int]]:
    """(source index of each item of ``items`` or -1, indices of ``items`` new to the source)."""
    where = {str(it["item_id"]): i for i, it in enumerate(source_items)}
    mapping = [where.get(str(it["item_id"]), -1) for it in items]
    return mapping, [j for j, m in enumerate(mapping) if m < 0]


def _new_rows(
    how: str,
    known: torch.Tensor,
    all_rows: torch.Tensor,
    new: list[int],
    pmi: torch.Tensor | None,
    known_idx: torch.Tensor,
    titles: list[list[int]] | None,
) -> torch.Tensor:
    """Rows [len(new), H] for the new items (see the module docstring)."""
    std, mean = known.std(), known.mean(0)
    noise = torch.randn(len(new), known.shape[1])
    fallback = mean + 0.1 * std * noise
    if how == "random":
        return noise * std
    if how == "title":
        assert titles is not None
        return torch.stack([all_rows[torch.tensor(t)].mean(0) if t else mean for t in titles])
    if how == "cooccurrence" and pmi is not None and known_idx.numel():
        # PMI weights of new item -> known items, as a dense [new, known] block (small: new x known).
        dense = pmi.index_select(0, torch.tensor(new)).index_select(1, known_idx).to_dense()
        weight = dense.sum(1, keepdim=True)
        mixed = dense @ known / weight.clamp(min=1e-12)
        return torch.where(weight > 0, mixed, fallback)
    return fallback


@torch.no_grad()
def load_warm_weights(
    cfg: RecGPTConfig,
    lm,
    tokenizer,
    items: list[dict],
    first_item: int,
    shards_dir: str | os.PathLike,
    warm: WarmStart,
) -> dict[str, int]:
    """Copy ``warm``'s weights into ``lm`` (built for ``items``) and initialise the new items' rows.

    Returns counts {known, new, dropped} (dropped: source items absent from ``items``). Raises
    :class:`ConfigError` naming ``train.init_from`` when a weight does not fit (another architecture).
    """
    from modeling.factory import _gathered, _shape, cooccurrence_pmi
    from modeling.model import is_tied

    if warm.first_item != first_item:
        raise ConfigError(f"train.init_from: item tokens start at id {warm.first_item} in {warm.source}, "
                          f"{first_item} here")  # fmt: skip
    mapping, new = item_mapping(warm.items, items)
    known_j = [j for j, m in enumerate(mapping) if m >= 0]
    known_src = torch.tensor([first_item + mapping[j] for j in known_j], dtype=torch.long)
    known_dst = torch.tensor([first_item + j for j in known_j], dtype=torch.long)
    heads = {id(lm.get_input_embeddings().weight)}
    if not is_tied(lm):
        heads.add(id(lm.get_output_embeddings().weight))
    pmi = (
        cooccurrence_pmi(cfg, shards_dir, len(items))
        if cfg.model.item_init == "cooccurrence" and new
        else None
    )
    titles = None
    if cfg.model.item_init == "title" and new:
        from modeling.collate import item_title

        titles = tokenizer([" " + item_title(items[j]) for j in new], add_special_tokens=False)["input_ids"]

    targets = dict(lm.named_parameters(remove_duplicate=False))
    buffers = dict(lm.named_buffers())
    missing = [k for k in targets if k not in warm.state]
    unexpected = [k for k in warm.state if k not in targets and k not in buffers]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ConfigError(f"train.init_from: the weights of {warm.source} do not fit this model ({what}); "
                          "warm starting needs the source's architecture")  # fmt: skip
    done: set[int] = set()
    for name, param in {**targets, **{k: v for k, v in buffers.items() if k in warm.state}}.items():
        if id(param) in done:  # tied: one tensor under two names
            continue
        done.add(id(param))
        src = warm.state[name]
        with _gathered([param]):
            if id(param) in heads:
                if src.shape[1] != _shape(param)[1] or src.shape[0] < first_item + len(warm.items):
                    raise ConfigError(f"train.init_from: {name} is {tuple(src.shape)} in {warm.source}, "
                                      f"{tuple(_shape(param))} here (another model size)")  # fmt: skip
                rows = param.data.float().clone()
                rows[:first_item] = src[:first_item]
                rows[known_dst] = src[known_src]
                if new:
                    known = src[known_src] if len(known_j) else src[first_item : first_item + len(warm.items)]
                    known_idx = torch.tensor(known_j, dtype=torch.long)
                    # Title rows read the (copied) token rows; PMI weights index this run's items.
                    rows[torch.tensor(new) + first_item] = _new_rows(
                        cfg.model.item_init, known, rows, new, pmi, known_idx, titles
                    )
                param.data.copy_(rows.to(param.dtype))
            else:
                if tuple(src.shape) != tuple(_shape(param)):
                    raise ConfigError(f"train.init_from: {name} is {tuple(src.shape)} in {warm.source}, "
                                      f"{tuple(_shape(param))} here (another architecture or size)")  # fmt: skip
                param.data.copy_(src.to(param.dtype))
    return {"known": len(known_j), "new": len(new), "dropped": len(warm.items) - len(known_j)}
