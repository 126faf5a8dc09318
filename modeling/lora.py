"""Partial tuning of the causal LM: PEFT LoRA / AdaLoRA, or freeze tuning (the top N blocks), each
with the item-token rows (and the head's item rows) trainable.

Without trainable item rows a model with frozen embeddings cannot learn items at all: the new
``<item_i>`` rows are made trainable through PEFT trainable tokens (only those rows, not the whole
vocabulary) — ``trainable_token_indices`` beside LoRA, the ``TrainableTokensConfig`` tuner under freeze
tuning. With a tied head PEFT ties the head's wrapper to the same rows; an untied head gets its own.
"""

from __future__ import annotations

import warnings

from torch import nn
from transformers import PreTrainedModel

from configs import ConfigError, RecGPTConfig

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
# Also recgpt's ligr preset (modeling/ligr.py names its modules as Llama does): attention projections
# and the SwiGLU FFN; its residual gates (attn_gate, ffn_gate) stay full-rank and frozen.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BART_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def default_target_modules(lm: nn.Module) -> list[str]:
    """LoRA targets by architecture, recognised from module names (GPT-2, Llama-style — recgpt's ligr
    included — or BART)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    for family in (GPT2_TARGETS, LLAMA_TARGETS if "o_proj" in leaves else BART_TARGETS):
        present = [t for t in family if t in leaves]
        if "c_attn" in present or "q_proj" in present:
            return present
    raise ConfigError(
        "lora.target_modules: unknown architecture, list the modules to adapt (e.g. [q_proj, v_proj])"
    )


def _module_name(lm: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in lm.named_modules() if m is module)


def _token_modules(lm: nn.Module, tied: bool) -> list[str]:
    """Names of the modules whose item rows train: the input embeddings (PEFT ties a tied head to
    them) and an untied output head."""
    names = [_module_name(lm, lm.get_input_embeddings())]
    return names if tied else [*names, _module_name(lm, lm.get_output_embeddings())]


def apply_lora(lm: PreTrainedModel, cfg: RecGPTConfig, item_token_ids: list[int], tied: bool) -> nn.Module:
    """Wrap ``lm`` in a PEFT model: adapters on the target modules, item rows trainable, rest frozen."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    lc = cfg.lora
    targets = list(lc.target_modules) if lc.target_modules else default_target_modules(lm)
    conv1d = any(isinstance(m, Conv1D) for n, m in lm.named_modules() if n.rsplit(".", 1)[-1] in targets)
    if tied:
        token_indices: list[int] | dict[str, list[int]] = list(item_token_ids)
    else:
        token_indices = {name: list(item_token_ids) for name in _token_modules(lm, tied)}
    # A decoder-only BART never runs its cross-attention (no encoder states): no adapters there. Only
    # passed when such modules exist (PEFT warns about an exclusion that matches nothing).
    has_cross_attention = any(".encoder_attn." in f"{n}." for n, _ in lm.named_modules())
    common = dict(
        target_modules=targets,
        exclude_modules=r".*\.encoder_attn\..*" if has_cross_attention else None,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        fan_in_fan_out=conv1d,  # GPT-2 stores Conv1D weights transposed
        trainable_token_indices=token_indices,
        bias="none",
    )
    if lc.method == "adalora":
        total = cfg.train.max_steps
        if total <= 0:
            raise ConfigError("lora.method: adalora needs train.max_steps > 0 (its rank budget schedule)")
        # Rank budget: start at 1.5x the target rank, prune between 10% and 80% of the run.
        peft_cfg = AdaLoraConfig(
            init_r=max(lc.r + lc.r // 2, lc.r + 1),
            target_r=lc.r,
            total_step=total,
            tinit=total // 10,
            tfinal=total // 5,
            deltaT=max(1, total // 50),
            **common,
        )
    else:
        peft_cfg = LoraConfig(r=lc.r, **common)
    with warnings.catch_warnings():
        # PEFT reads the model's deprecated `is_gradient_checkpointing` attribute (transformers >= 5.24
        # renamed it is_activation_checkpointing): a FutureWarning that no setting of ours avoids.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(lm, peft_cfg)


def decoder_blocks(lm: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM, bottom first, found by structure rather than by name: its
    longest ``ModuleList`` whose entries are all of one class (GPT-2's ``transformer.h``, Llama's
    ``model.layers``, BART's ``decoder.layers``). :class:`ConfigError` if it has none."""
    stacks = [
        m
        for m in lm.modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(block) for block in m}) == 1
    ]
    if not stacks:
        raise ConfigError(
            f"model.trainable_layers: no list of transformer blocks found in {type(lm).__name__}"
        )
    return max(stacks, key=len)


def apply_freeze(lm: PreTrainedModel, cfg: RecGPTConfig, item_token_ids: list[int], tied: bool) -> nn.Module:
    """Freeze tuning: wrap ``lm`` in PEFT's trainable-tokens tuner (the item rows of the embeddings and
    of an untied head trainable, every base weight frozen), then let the top ``model.trainable_layers``
    blocks train again — those of their weights that were trainable before (BART's never-run
    cross-attention stays frozen). The blocks are trained in place, so the export merges only the
    item rows (PEFT ``merge_and_unload``) and is a plain model like a full-tuning run's.

    Raises :class:`ConfigError` when the model has fewer blocks than asked for."""
    from peft import TrainableTokensConfig, get_peft_model

    n = cfg.model.trainable_layers
    if n is None:
        raise ValueError("apply_freeze needs model.trainable_layers")
    blocks = decoder_blocks(lm)
    if n > len(blocks):
        raise ConfigError(
            f"model.trainable_layers: got {n}, but {type(lm).__name__} has only {len(blocks)} blocks"
        )
    top = [p for block in list(blocks)[len(blocks) - n :] for p in block.parameters() if p.requires_grad]
    peft_cfg = TrainableTokensConfig(
        target_modules=_token_modules(lm, tied), token_indices=list(item_token_ids)
    )
    with warnings.catch_warnings():
        # As in apply_lora: PEFT reads transformers' deprecated is_gradient_checkpointing attribute.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # PEFT's generic check warns that a tied embedding is targeted; this tuner ties the head's rows
        # to the embedding's adapter itself (TrainableTokensModel.inject_adapter).
        warnings.filterwarnings("ignore", message=".*no implementation exists to tie the adapters.*")
        wrapped = get_peft_model(lm, peft_cfg)
    for p in top:
        p.requires_grad_(True)
    return wrapped


def adalora_update(model: nn.Module, global_step: int) -> None:
    """AdaLoRA's rank reallocation; call after the backward and before the optimizer step zeroes the
    gradients (it reads parameter ``.grad``, hence ZeRO stage 0 only). No-op for other methods."""
    lm = getattr(getattr(model, "module", model), "lm", model)
    tuner = getattr(lm, "base_model", None)
    if hasattr(tuner, "update_and_allocate"):
        tuner.update_and_allocate(global_step)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (shared tensors counted once)."""
    trainable = total = 0
    for p in model.parameters():
        n = (
            p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        )  # ZeRO-3 partitions report their full size here
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
