"""RecModel: a Hugging Face causal LM (optionally PEFT-wrapped) scored over item tokens only.

Every weight access happens inside some module's forward (the input-embedding module, the output
head, the rating head), because under ZeRO-3 parameters are partitioned and only gathered by the
hooks DeepSpeed puts on each module's forward.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


def is_tied(lm: PreTrainedModel) -> bool:
    """Whether the LM's output head shares the input-embedding matrix (then item logits come from the
    item tokens' input embeddings)."""
    out = lm.get_output_embeddings()
    return out is not None and out.weight is lm.get_input_embeddings().weight


# Bounds of the length groups: a row of length n joins the group of the smallest bound >= n (or T).
_GROUP_WIDTHS = (8, 16, 32, 64, 128, 256, 512)
# Below this many padded positions saved, one call at the batch width is cheaper than several calls.
_MIN_SAVED_POSITIONS = 256


def length_groups(attention_mask: torch.Tensor | None) -> list[tuple[torch.Tensor, int]] | None:
    """Rows of a right-padded batch grouped by length, as ``[(row indices [n] int64, width), ...]``.

    ``attention_mask`` [B, T] (1 = token, 0 = padding). A row of ``n`` tokens goes to the group of the
    smallest bound in ``(8, 16, 32, …, T)`` that holds it; a group's width is its longest row. ``None``
    when grouping does not pay (no mask, a mask that is not a prefix of ones per row, or fewer than 256
    padded positions saved): then the batch runs as it is. Several GPU/CPU kernel launches per group
    are the price; on recommendation batches the saving is most of the transformer's work.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    B, T = attention_mask.shape
    lengths = attention_mask.sum(1)
    positions = torch.arange(T, device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
        return None  # left padding or holes: positions would shift, keep the plain path
    bounds = torch.tensor([w for w in _GROUP_WIDTHS if w < T] + [T], device=lengths.device)
    group_of = torch.bucketize(lengths, bounds)  # index of the smallest bound >= length
    groups = []
    for g in torch.unique(group_of).tolist():
        rows = torch.nonzero(group_of == g).squeeze(1)
        groups.append((rows, max(1, int(lengths[rows].max()))))
    if B * T - sum(rows.numel() * width for rows, width in groups) < _MIN_SAVED_POSITIONS:
        return None
    return groups


def _whole_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` (or a subclass that only scales its output) whose whole weight is here: not a
    PEFT wrapper (its forward adds the adapters), not a ZeRO-3 partition (only calling it gathers it)."""
    return isinstance(module, nn.Embedding) and not hasattr(module.weight, "ds_id")


class RecModel(nn.Module):
    """``forward`` returns the final hidden states; ``item_logits`` / ``rating_output`` score them.

    ``lm`` is the causal LM (a ``PeftModel`` under LoRA). ``item_token_ids[i]`` is the token id of
    ``<item_i>``. ``tied``: the output head shares the input-embedding matrix, so the item rows of the
    head are the input embeddings of the item tokens (fetched by calling the embedding module, which
    also returns the trained rows under PEFT ``trainable_token_indices``).
    """

    def __init__(
        self,
        lm: nn.Module,
        item_token_ids: torch.Tensor,
        tied: bool,
        rating_levels: list[float] | None = None,
        rating_head: str = "classes",
    ) -> None:
        super().__init__()
        self.lm = lm
        self.tied = tied
        self.register_buffer("item_token_ids", item_token_ids.long(), persistent=False)
        ids = self.item_token_ids
        # Item tokens are one contiguous id range (modeling.factory reserves them so): the whole catalogue's
        # rows are then a slice of the embedding matrix, not a gather copying it (1M x 64 fp32: 256 MB).
        contiguous = ids.numel() > 0 and bool(
            (ids == torch.arange(ids.numel(), device=ids.device) + ids[0]).all()
        )
        self._item_range = (int(ids[0]), int(ids[0]) + ids.numel()) if contiguous else None
        self.rating_head: nn.Linear | None = None
        if rating_levels is not None:
            # The config, not the embedding module: under PEFT the module is a TrainableTokensWrapper.
            hidden = self.causal_lm.config.hidden_size
            out = len(rating_levels) if rating_head == "classes" else 1
            self.rating_head = nn.Linear(hidden, out)
            self.register_buffer(
                "rating_values", torch.tensor(rating_levels, dtype=torch.float32), persistent=False
            )
        self.regression = rating_head == "regression"

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The HF causal LM (inside the PEFT wrapper, adapters injected in place)."""
        lm = self.lm
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    @property
    def num_items(self) -> int:
        return self.item_token_ids.numel()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, through the embedding module (the adversarial step perturbs these)."""
        return self.causal_lm.get_input_embeddings()(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states [B, T, H]; the LM head is skipped (item_logits scores what is needed)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        groups = None if self._partitioned() else length_groups(attention_mask)
        if groups is None:
            return self._body(inputs_embeds, attention_mask)
        # Right-padded rows of very different lengths (a recommendation batch: most histories are short,
        # a few reach max_len): run each group of rows at its own width instead of the batch's. The
        # model is causal and the padding is on the right, so a real position sees the same inputs
        # either way; only the padded positions (never scored) are left out — most of the compute.
        B, T = attention_mask.shape
        hidden = inputs_embeds.new_zeros(B, T, self.causal_lm.config.hidden_size)
        for rows, width in groups:
            hidden[rows, :width] = self._body(inputs_embeds[rows, :width], attention_mask[rows, :width])
        return hidden

    def _partitioned(self) -> bool:
        """Whether ZeRO-3 partitions the weights: each module call then gathers them with a collective,
        so every rank must make the same calls — and ranks' batches have different length groups."""
        return getattr(next(self.lm.parameters()), "ds_id", None) is not None

    def _body(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        body = self.causal_lm.base_model  # GPT2Model / LlamaModel / ...: the transformer without its head
        out = body(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def item_logits(self, hidden: torch.Tensor, items: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Scores [..., num_items] (or [..., len(items)] for a subset of item indices: a tensor of them, or
        a ``slice`` of the index range — the chunks of full ranking) from the item rows of the output head
        only — never a softmax over the whole vocabulary."""
        token_ids = self.item_token_ids if items is None else self.item_token_ids[items]
        if self.tied:
            emb_module = self.causal_lm.get_input_embeddings()
            span = slice(0, self.num_items) if items is None else items
            if isinstance(span, slice) and self._item_range is not None and _whole_embedding(emb_module):
                # The raw matrix's item rows as a view (what the gather below returns, without the copy).
                lo, hi, _ = span.indices(self.num_items)
                rows = emb_module.weight[self._item_range[0] + lo : self._item_range[0] + hi]
            else:
                rows = emb_module(token_ids)
                # Scaled embeddings (Gemma) multiply inside the module; the tied head uses the raw matrix.
                scale = getattr(getattr(emb_module, "base_layer", emb_module), "embed_scale", None)
                if scale is not None and float(scale) != 1.0:
                    rows = rows / torch.as_tensor(scale, dtype=rows.dtype, device=rows.device)
            return hidden @ rows.to(hidden.dtype).t()
        # Untied head: call it (so ZeRO-3 gathers it and PEFT merges trained rows), keep item columns.
        # This costs a vocabulary-sized matmul at the scored positions, but the softmax stays over items.
        return self.causal_lm.get_output_embeddings()(hidden)[..., token_ids]

    def rating_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """Rating logits [..., levels] (classes) or predicted ratings [...] (regression)."""
        if self.rating_head is None:
            raise RuntimeError("this RecModel was built for task=next_item and has no rating head")
        out = self.rating_head(hidden)
        return out.squeeze(-1) if self.regression else out
