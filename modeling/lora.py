"""PEFT LoRA / AdaLoRA on the causal LM, with the item-token rows (and the head's item rows) trainable.

Without trainable item rows a LoRA model cannot learn items at all: the new ``<item_i>`` rows are
made trainable through PEFT ``trainable_token_indices`` (only those rows, not the whole vocabulary).
With a tied head PEFT ties the head's wrapper to the same rows; an untied head gets its own.
"""

from __future__ import annotations

import warnings

from torch import nn
from transformers import PreTrainedModel

from configs import ConfigError, RecGPTConfig

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BART_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def default_target_modules(lm: nn.Module) -> list[str]:
    """LoRA targets by architecture, recognised from module names (GPT-2, Llama-style or BART)."""
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
        token_indices = {
            _module_name(lm, lm.get_input_embeddings()): list(item_token_ids),
            _module_name(lm, lm.get_output_embeddings()): list(item_token_ids),
        }
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
