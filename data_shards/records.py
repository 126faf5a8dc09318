"""The two data types that cross package boundaries: a shard **record** and a model **batch**.

A record is what ``recgpt shards build`` writes (a JSON dict inside a tar member) and what
:class:`~data_shards.reader.ShardLoader` yields; a batch is what ``modeling.collate`` makes of a list of
records and what the model, the loss, the metrics and the trainer consume. Both are defined here once,
at the lowest layer that handles them, and every package annotates with these names.
"""

from __future__ import annotations

from typing import TypedDict

import torch

IGNORE_INDEX = -100
"""``labels`` value of a position that is not supervised (PyTorch's cross-entropy ``ignore_index``)."""
SEEN_PAD = -1
"""Padding value of ``Batch.seen``."""


class Record(TypedDict, total=False):
    """One user's window (train) or one user's history + target (valid/test); lists are time-ordered.

    Keys always present: ``user``, ``uid``, ``items``, ``ratings``, ``timestamps``.
    """

    user: str
    """Original user id, as spelled in the input."""
    uid: int
    """Dense user index (0..num_users-1)."""
    items: list[int]
    """Dense item indices (0..num_items-1), oldest first; eval records end with the target."""
    ratings: list[float]
    """One rating per item (1.0 where the source has none)."""
    timestamps: list[int]
    """One timestamp per item (the build's time unit, see the manifest)."""
    seen: list[int]
    """Valid/test only: every item of the user before the target (the whole history, not only the window)."""
    first_new_target: int
    """Train only: index in ``items`` of the first target that no earlier window of the user holds."""
    pad: bool
    """Set by the reader on filler copies (last eval batches, replaced corrupt shards): never scored."""


class Batch(TypedDict, total=False):
    """Tensors of B records, right-padded to the longest prompt T (all on one device).

    Keys always present: ``input_ids``, ``attention_mask``, ``labels``, ``ratings``; eval batches
    (valid/test) also carry ``seen``, ``target`` and ``valid``.
    """

    input_ids: torch.Tensor
    """[B, T] int64 token ids; padding holds the tokenizer's pad id."""
    attention_mask: torch.Tensor
    """[B, T] int64, 1 on real tokens, 0 on padding."""
    labels: torch.Tensor
    """[B, T] int64: next_item — the dense item index to predict after this position; rating — the
    rating-level index; IGNORE_INDEX elsewhere. Eval batches: exactly one label per row."""
    ratings: torch.Tensor
    """[B, T] float32: the rating at labelled positions, 0 elsewhere."""
    seen: torch.Tensor
    """[B, S] int64: each row's history items (Record.seen), SEEN_PAD-padded; masked in full ranking."""
    target: torch.Tensor
    """[B] int64: the dense index of each row's target item."""
    valid: torch.Tensor
    """[B] bool: False on pad rows (Record.pad), which metrics drop."""
    unknown_target: torch.Tensor
    """[B] bool, only when scoring shards of another item vocabulary: the target is an item the model
    does not know (scored as a miss; ``modeling.collate.RemappedCollate``)."""
    unknown_history: torch.Tensor
    """[B] bool, likewise: the target is known but no history item is (scored as a miss)."""
