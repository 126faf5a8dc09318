"""Records -> tensors, run inside the reader's DataLoader workers (must pickle: plain lists only).

A prompt is BOS [+ "User rated:"] followed by one *entry* per history item: the item part (item i's token
id, :func:`first_item_token_id` + i, for ``prompt=ids``; `` Title`` for ``prompt=text``) then its rating
part (``prompt=text``: `` 4.5/5;``; ``prompt=ids`` only for the rating task: `` 4.5``). Labels sit on the last token of a part:

* ``next_item``: after entry t (item + rating) the label is item t+1 — every entry for train
  ``objective=all``; for ``objective=new`` only the targets from the record's ``first_new_target`` on
  (each target once, with its longest window history); the last one only for ``objective=last`` and
  for eval records (label = target).
* ``rating``: after the item part of entry t (before its rating) the label is its rating level;
  train supervises every item, eval only the target (the last item, whose rating part is left out).

Batches are right-padded; ``labels`` holds an item index (next_item) or a rating-level index (rating)
per position, IGNORE_INDEX elsewhere; ``ratings`` the float rating at supervised positions. The types
are :class:`data_shards.records.Record` and :class:`data_shards.records.Batch`.

What the collate needs of a config is a :class:`PromptSpec` (task, prompt format, objective, history
length): serving builds one from an export's saved config without the training schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from data_shards.records import IGNORE_INDEX, SEEN_PAD, Batch, Record

TEXT_PREFIX = "User rated:"
RATING_LEVELS_KEY = "recgpt_rating_levels"  # tokenizer.init_kwargs key (saved in tokenizer_config.json)
FIRST_ITEM_KEY = "recgpt_first_item_token_id"  # likewise: the token id of item 0


def first_item_token_id(tokenizer) -> int:
    """The token id of item 0; item ``i`` is this + ``i`` (contiguous ids past the tokenizer's own).

    Read from the tokenizer's ``init_kwargs`` (saved in ``tokenizer_config.json`` by modeling.factory).
    The item tokens are ids only, never strings of the tokenizer: an HF tokenizer with a million added
    tokens takes a minute and gigabytes to load. Tokenizers saved before this key carry ``<item_i>``
    added tokens instead, read here too. Raises ValueError when the tokenizer has neither.
    """
    first = tokenizer.init_kwargs.get(FIRST_ITEM_KEY)
    if first is not None:
        return int(first)
    legacy = tokenizer.convert_tokens_to_ids("<item_0>")
    if legacy is None or legacy == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no item token ids ({FIRST_ITEM_KEY} in tokenizer_config.json)")
    return int(legacy)


def rating_text(rating: float, max_rating: float, prompt: str) -> str:
    """How a rating is written after an item in the prompt (also fed to the tokenizer trainer)."""
    return f" {rating:g}/{max_rating:g};" if prompt == "text" else f" {rating:g}"


def item_title(item: dict) -> str:
    return (item.get("title") or "").strip() or f"item {item['item_id']}"


@dataclass(frozen=True)
class PromptSpec:
    """The settings that decide how records become prompts and labels."""

    task: str
    """next_item or rating (config key ``task``)."""
    prompt: str
    """ids or text (``model.prompt``)."""
    objective: str
    """all, new or last (``train.objective``; train split only)."""
    max_history: int
    """History items kept per record, the most recent (``data.max_history`` resolved against the shards)."""

    @classmethod
    def from_config(cls, cfg: Any, max_history: int) -> PromptSpec:
        """From a RecGPTConfig (duck-typed: this module does not import the schema)."""
        return cls(cfg.task, cfg.model.prompt, cfg.train.objective, max_history)


class RecordCollator:
    """Picklable collate function; every token id it needs is computed once in ``make_collate``."""

    def __init__(
        self,
        *,
        task: str,
        prompt: str,
        objective: str,
        split: str,
        max_history: int,
        max_len: int,
        prefix_ids: list[int],
        pad_id: int,
        item_part_ids: list[list[int]],
        rating_levels: list[float],
        rating_part_ids: list[list[int]],
    ) -> None:
        self.task, self.prompt, self.objective, self.split = task, prompt, objective, split
        self.max_history, self.max_len = max_history, max_len
        self.prefix_ids, self.pad_id = prefix_ids, pad_id
        self.item_part_ids = item_part_ids
        self.rating_levels, self.rating_part_ids = rating_levels, rating_part_ids
        self.rate_history = task == "rating" or prompt == "text"

    # ------------------------------------------------------------------ one record
    def _level(self, rating: float, record: dict) -> int:
        best = min(range(len(self.rating_levels)), key=lambda i: abs(self.rating_levels[i] - rating))
        if abs(self.rating_levels[best] - rating) > 1e-6:
            raise ValueError(
                f"record of user {record.get('user')!r}: rating {rating} is not one of the manifest's "
                f"rating_levels {self.rating_levels}"
            )
        return best

    def _entries(self, record: dict) -> list[tuple[list[int], list[int]]]:
        """(item part, rating part) token ids per entry, before labels are attached."""
        items, ratings = record["items"], record["ratings"]
        n = len(items)
        out = []
        for t in range(n):
            last = t == n - 1
            item_part = self.item_part_ids[items[t]]
            rated = self.rate_history and not (last and self.task == "rating")
            rating_part = self.rating_part_ids[self._level(ratings[t], record)] if rated else []
            if self.task == "next_item" and last:
                break  # the last item is only a label (train) or the target (eval)
            out.append((item_part, rating_part))
        return out

    def _labels(self, record: dict) -> list[tuple[int, int, float]]:
        """(entry index, label, rating) per supervised entry; the label goes after the item part
        (rating task) or after the whole entry (next_item)."""
        items, ratings = record["items"], record["ratings"]
        n = len(items)
        eval_or_last = self.split != "train" or self.objective == "last"
        if self.task == "next_item":
            first = int(record.get("first_new_target", 1)) if self.objective == "new" else 1
            ts = [n - 2] if eval_or_last else range(max(0, first - 1), n - 1)
            return [(t, items[t + 1], float(ratings[t + 1])) for t in ts]
        ts = [n - 1] if self.split != "train" else range(n)
        return [(t, self._level(ratings[t], record), float(ratings[t])) for t in ts]

    def encode(self, record: dict) -> tuple[list[int], list[int], list[float]]:
        items = record.get("items") or []
        if len(items) < 2 and not (self.task == "rating" and len(items) == 1):
            raise ValueError(
                f"record of user {record.get('user')!r}: needs at least 2 items, got {len(items)}"
            )
        keep = self.max_history + 1  # history + the target (eval) / the last label (train window)
        if len(items) > keep:
            dropped = len(items) - keep
            record = {
                **record,
                "items": items[-keep:],
                "ratings": record["ratings"][-keep:],
                "first_new_target": int(record.get("first_new_target", 1)) - dropped,
            }
        entries = self._entries(record)
        labels_at = {t: (label, rating) for t, label, rating in self._labels(record)}
        # Drop the oldest entries until the prompt fits the model's context.
        sizes = [len(a) + len(b) for a, b in entries]
        budget = self.max_len - len(self.prefix_ids)
        first = 0
        while first < len(entries) and sum(sizes[first:]) > budget:
            first += 1
        ids = list(self.prefix_ids)
        labels = [IGNORE_INDEX] * len(ids)
        values = [0.0] * len(ids)
        for t in range(first, len(entries)):
            item_part, rating_part = entries[t]
            ids += item_part
            labels += [IGNORE_INDEX] * len(item_part)
            values += [0.0] * len(item_part)
            if self.task == "rating" and t in labels_at:
                labels[-1], values[-1] = labels_at[t]
            ids += rating_part
            labels += [IGNORE_INDEX] * len(rating_part)
            values += [0.0] * len(rating_part)
            if self.task == "next_item" and t in labels_at:
                labels[-1], values[-1] = labels_at[t]
        if all(x == IGNORE_INDEX for x in labels):
            raise ValueError(
                f"record of user {record.get('user')!r}: nothing to predict within max_len={self.max_len}"
            )
        return ids, labels, values

    # ------------------------------------------------------------------ batch
    def __call__(self, records: Sequence[Record]) -> Batch:
        encoded = [self.encode(r) for r in records]
        width = max(len(ids) for ids, _, _ in encoded)
        B = len(records)
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, width), dtype=torch.long)
        labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
        ratings = torch.zeros((B, width), dtype=torch.float32)
        for b, (ids, lab, val) in enumerate(encoded):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            attention_mask[b, :n] = 1
            labels[b, :n] = torch.tensor(lab)
            ratings[b, :n] = torch.tensor(val)
        batch: Batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "ratings": ratings,
        }
        if self.split != "train":
            seen = [r.get("seen") or [] for r in records]
            seen_t = torch.full((B, max(1, max(len(s) for s in seen))), SEEN_PAD, dtype=torch.long)
            for b, s in enumerate(seen):
                if s:
                    seen_t[b, : len(s)] = torch.tensor(s)
            batch["seen"] = seen_t
            batch["target"] = torch.tensor([r["items"][-1] for r in records], dtype=torch.long)
            batch["valid"] = torch.tensor([not r.get("pad", False) for r in records], dtype=torch.bool)
        return batch


def make_collate(
    spec: PromptSpec, tokenizer, items: list[dict], split: str, rating_levels: Sequence[float] | None = None
) -> RecordCollator:
    """The collate function for ``split`` (train, valid or test); see the module docstring.

    ``items`` is the shard vocabulary (``items.jsonl`` rows, index order); ``rating_levels`` the
    manifest's sorted rating levels (default: those stored on the tokenizer by the factory).
    """
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split: got {split!r}, allowed: train, valid, test")
    prompt = spec.prompt
    if rating_levels is None:  # stored on (and saved with) the tokenizer by modeling.factory
        rating_levels = tokenizer.init_kwargs.get(RATING_LEVELS_KEY) or []
    levels = [float(x) for x in rating_levels]
    if not levels and (spec.task == "rating" or prompt == "text"):
        raise ValueError(
            f"task={spec.task} prompt={prompt} needs the manifest's rating_levels (none on the tokenizer)"
        )
    first_item = first_item_token_id(tokenizer)
    if prompt == "ids":
        item_part_ids = [[first_item + i] for i in range(len(items))]
    else:  # titles tokenised once here, not per record in the workers
        item_part_ids = tokenizer([" " + item_title(it) for it in items], add_special_tokens=False)[
            "input_ids"
        ]
    rating_strings = [rating_text(r, max(levels), prompt) for r in levels]
    rating_part_ids = tokenizer(rating_strings, add_special_tokens=False)["input_ids"] if levels else []
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix_ids = [bos] + (
        tokenizer(TEXT_PREFIX, add_special_tokens=False)["input_ids"] if prompt == "text" else []
    )
    return RecordCollator(
        task=spec.task,
        prompt=prompt,
        objective=spec.objective,
        split=split,
        max_history=spec.max_history,
        max_len=int(min(tokenizer.model_max_length, 10**6)),
        prefix_ids=prefix_ids,
        pad_id=tokenizer.pad_token_id,
        item_part_ids=[list(x) for x in item_part_ids],
        rating_levels=levels,
        rating_part_ids=[list(x) for x in rating_part_ids],
    )


# --------------------------------------------------------------------------- another item vocabulary


def item_remap(model_items: Sequence[dict], data_items: Sequence[dict]) -> list[int] | None:
    """Data item index -> the model's index of the same ``item_id`` (-1: unknown to the model), or
    None when both vocabularies are the same list (nothing to translate)."""
    ours = {str(it["item_id"]): i for i, it in enumerate(model_items)}
    remap = [ours.get(str(it["item_id"]), -1) for it in data_items]
    return None if remap == list(range(len(model_items))) else remap


class RemappedCollate:
    """Eval records of shards with another item vocabulary (a periodic build, scored by the model of
    an earlier period), translated into the model's indices before ``collate``.

    History items the model does not know are left out of the prompt and of ``seen``. A record whose
    target is unknown, or whose history holds no known item, is still one example (a placeholder
    prompt is scored): ``unknown_target`` / ``unknown_history`` [B] bool mark it, and the metrics count
    it as a miss (:func:`modeling.metrics.eval_outputs`).
    """

    def __init__(self, collate: RecordCollator, remap: list[int]) -> None:
        if collate.split == "train" or collate.task != "next_item":
            raise ValueError("another item vocabulary can only be scored on valid/test for task next_item")
        self.collate, self.remap = collate, remap

    def _translate(self, record: dict) -> tuple[dict, bool, bool]:
        mapped = [self.remap[i] for i in record["items"]]
        keep = [t for t in range(len(mapped) - 1) if mapped[t] >= 0]
        unknown_target, unknown_history = mapped[-1] < 0, not keep
        keep = keep or [len(mapped) - 1]  # a placeholder entry: the prompt must hold one item
        items = [max(mapped[t], 0) for t in keep] + [max(mapped[-1], 0)]
        out = {
            **record,
            "items": items,
            "ratings": [record["ratings"][t] for t in keep] + [record["ratings"][-1]],
            "seen": [self.remap[i] for i in record.get("seen") or [] if self.remap[i] >= 0],
        }
        return out, unknown_target, unknown_history

    def __call__(self, records: Sequence[Record]) -> Batch:
        translated = [self._translate(r) for r in records]
        batch = self.collate([t[0] for t in translated])
        batch["unknown_target"] = torch.tensor([t[1] for t in translated], dtype=torch.bool)
        batch["unknown_history"] = torch.tensor([t[2] and not t[1] for t in translated], dtype=torch.bool)
        return batch
