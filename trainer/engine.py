"""DeepSpeed engine construction: param groups, the optimizer (AdamW or SGD), the LR schedule,
``deepspeed.initialize``.

recgpt builds the optimizer and the schedule itself and hands both to DeepSpeed (a client optimizer),
so the DeepSpeed JSON (:func:`deepspeed_config`) carries only parallelism/precision settings (and
gradient clipping), and the schedule is the same one for every optimizer and ZeRO stage. DeepSpeed
steps the scheduler once per optimizer step (skipped fp16 overflow steps included in its bookkeeping)
and saves/loads its state in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from configs import RecGPTConfig


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: RecGPTConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the typed config (never kept by hand); ``zero.extra`` last.

    ``train_batch_size`` = micro_batch_size x grad_accum x world_size (DeepSpeed checks the product).
    """
    z = cfg.zero
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage >= 1:
        zero["overlap_comm"] = z.overlap_comm
        zero["contiguous_gradients"] = True
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if z.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if z.stage == 3:
        # Gathered 16-bit weights let rank 0 save a consolidated model (export, evaluation).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    precision = cfg.train.precision
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.name == "sgd" and z.stage >= 1:
        # ZeRO's optimizer wrappers step any torch optimizer on their flat fp32 partitions; DeepSpeed
        # lists only its tested (Adam-family) ones and asks for this flag for the others.
        ds["zero_allow_untested_optimizer"] = True
        if z.offload_optimizer:
            # No DeepSpeed CPU SGD exists: torch's SGD steps the offloaded partitions on the CPU.
            ds["zero_force_ds_cpu_optimizer"] = False
    return _deep_merge(ds, z.extra)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed matrices and undecayed biases/norm weights.

    The rule is the nanoGPT one: tensors with >= 2 dims (matmul weights, embeddings) decay; 1-D tensors
    (biases, LayerNorm/RMSNorm gains) do not. Frozen parameters (LoRA base weights) are left out.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # Under ZeRO-3 zero.Init a parameter may already be partitioned: ds_shape is its real shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: RecGPTConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``optim.name``: AdamW (DeepSpeed's CPU Adam when optimizer states are offloaded, torch's
    otherwise) or torch's SGD with (Nesterov) momentum, over :func:`param_groups`."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (check lora.* / model.*)")
    # torch's fused CUDA kernels need no DeepSpeed op build; on CPU (offloaded states included) the
    # foreach path is the fast one.
    fused = torch.cuda.is_available() and not cfg.zero.offload_optimizer
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, fused=fused)
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if cfg.zero.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-built C++ op: only when asked for

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=fused, **kwargs)


@dataclass
class LRSchedule:
    """Multiplier of optim.lr at optimizer step ``s`` (what LambdaLR calls; a picklable object).

    Linear warm-up reaching 1.0 after ``warmup_steps`` (the first step already gets a small non-zero
    rate), then cosine or linear decay to ``min_ratio`` at ``total_steps`` (or constant).
    """

    warmup_steps: int
    total_steps: int
    decay: str
    min_ratio: float

    def __call__(self, s: int) -> float:
        if s < self.warmup_steps:
            return (s + 1) / (self.warmup_steps + 1)
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (s - self.warmup_steps) / span)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_scheduler(cfg: RecGPTConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    s = cfg.schedule
    fn = LRSchedule(s.warmup_steps, total_steps, s.decay, s.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def register_zero3_external_params(model: torch.nn.Module) -> list[str]:
    """Make ZeRO-3 gather parameters that a forward reads from child modules it never calls.

    ZeRO-3 gathers a module's own parameters when that module's forward runs. A module that keeps
    parameters in a child ``ParameterDict``/``ParameterList`` (whose forward never runs) and reads its
    children's weights directly — PEFT's trainable item-token rows, LoRA on embeddings — would see
    empty partitions ("Number of indices (N) should be equal to source.size(dim) (0)"). Registering
    its whole subtree as external parameters of that module makes DeepSpeed gather them for its
    forward and backward while their gradients keep the normal reduce hooks (DeepSpeed "leaf"
    modules instead reduce in a module backward hook, which never fires when the module's input is
    integer token ids). Returns the names of the modules so treated.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    names = []
    for name, m in model.named_modules():
        if any(isinstance(c, (torch.nn.ParameterDict, torch.nn.ParameterList)) for c in m.children()):
            for p in m.parameters():
                register_external_parameter(m, p)
            names.append(name)
    return names


def size_buckets(ds_config: dict, hidden: int) -> dict:
    """Communication buckets sized to the model, as the Hugging Face integration's ``auto`` values do.

    DeepSpeed's defaults (5e8 elements, 2 GB in fp32) are meant for billion-parameter models on GPUs;
    on a small model they keep buffers larger than the partitioned states ZeRO is there to save.
    Keys set through ``zero.extra`` win."""
    zero = ds_config["zero_optimization"]
    if zero["stage"] >= 1:
        zero.setdefault("reduce_bucket_size", hidden * hidden)
    if zero["stage"] == 3:
        zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
        zero.setdefault("stage3_param_persistence_threshold", 10 * hidden)
    return ds_config


def build_engine(
    cfg: RecGPTConfig, model: torch.nn.Module, world_size: int, total_steps: int, load_universal: bool = False
):
    """``deepspeed.initialize`` with recgpt's optimizer and schedule; returns the engine.

    ``load_universal``: the engine will load a universal checkpoint (a resume on another world size;
    DeepSpeed reads the flag only when loading)."""
    import deepspeed

    if cfg.zero.stage == 3:
        register_zero3_external_params(model)

    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    ds_config = size_buckets(deepspeed_config(cfg, world_size), model_hidden_size(model))
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    if cfg.zero.offload_optimizer:
        # Our DeepSpeedCPUAdam is what DeepSpeed wants for offload; nothing to override.
        ds_config.setdefault("zero_force_ds_cpu_optimizer", True)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    if keeps_clipping_norm(cfg):
        keep_clipping_norm(engine)
    return engine


def keeps_clipping_norm(cfg: RecGPTConfig) -> bool:
    """Plain fp32 ZeRO-0 with clipping: DeepSpeed computes the global norm to clip and drops it."""
    return cfg.zero.stage == 0 and cfg.train.precision == "fp32" and cfg.optim.grad_clip > 0


def keep_clipping_norm(engine) -> None:
    """Keep the norm plain fp32 ZeRO-0's clipping computes as the engine's global gradient norm, so a
    logged step reads it instead of a second pass over every gradient (:func:`param_grad_norm`: 0.63 ms
    a rank and step in the text throughput benchmark at ``train.log_interval=1``, ~1 % of its step).

    DeepSpeed's ``clip_fp32_gradients`` calls ``deepspeed.runtime.utils.clip_grad_norm_`` (the global
    pre-clipping L2 norm, returned) and discards the result; this makes the same call and keeps it.
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
        )

    engine.clip_fp32_gradients = clip_fp32_gradients


def model_hidden_size(model: torch.nn.Module) -> int:
    lm = getattr(model, "causal_lm", model)
    return int(lm.config.get_text_config().hidden_size)


def global_grad_norm(engine) -> float | None:
    """Gradient norm of the last optimizer step, where DeepSpeed tracks it (ZeRO >= 1, bf16, fp16) or
    :func:`keep_clipping_norm` keeps it (fp32 ZeRO-0 with clipping).

    Plain fp32 ZeRO-0 without clipping computes no norm: :func:`param_grad_norm` measures it before the
    step instead.
    """
    n = engine.get_global_grad_norm()
    if n is None:
        return None
    return float(n.item() if torch.is_tensor(n) else n)


def param_grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of the (already all-reduced) .grad of every parameter (ZeRO-0 fp32 only)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def tracks_grad_norm(cfg: RecGPTConfig) -> bool:
    """Whether the engine records the global gradient norm for this configuration (DeepSpeed itself,
    or :func:`keep_clipping_norm`)."""
    return cfg.zero.stage > 0 or cfg.train.precision != "fp32" or keeps_clipping_norm(cfg)


@contextmanager
def gradients_zeroed(module: torch.nn.Module) -> Iterator[None]:
    """Within: the gradient a backward computes for each trainable parameter of ``module`` is replaced by
    zeros before it is accumulated (a tensor hook; DeepSpeed's accumulation and reduction hooks run after
    it, for ZeRO 0-3 alike). For a micro-batch whose loss is non-finite on this rank: its backward runs
    like the other ranks' (the same collectives in the same order: nothing hangs), NaN or inf flows
    through the graph but reaches no gradient, and the micro-batch adds exactly nothing to the step."""
    handles = [p.register_hook(torch.zeros_like) for p in module.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
