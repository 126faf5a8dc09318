"""All of recgpt's settings in one typed place.

Every default lives here (one-line docstring per field); YAML files in ``configs/`` hold only
overrides and CLI ``key=value`` dotlist overrides apply last. Unknown keys, wrong types and
impossible combinations raise :class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad configuration value; the message is one line that names the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}, allowed: {', '.join(map(str, allowed))}")


@dataclass
class DataConfig:
    shards: str = "runs/shards/ml-latest-small"
    """The shard directory (or URL prefix webdataset can open) holding manifest.json."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = read in the training process)."""
    max_history: int = 50
    """Items of history fed to the model; longer windows/histories keep their most recent items."""
    corrupt_shard_tolerance: int = 0
    """How many corrupt shards a run may skip (logged) before it stops; 0 = stop at the first."""
    prefetch_factor: int = 4
    """Batches each DataLoader worker prepares ahead."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.max_history >= 1, "data.max_history", "must be >= 1")
        _check(self.corrupt_shard_tolerance >= 0, "data.corrupt_shard_tolerance", "must be >= 0")


@dataclass
class ModelConfig:
    preset: str | None = "tiny"
    """Named random-init architecture (tiny, small, base) built locally; null to load name_or_path."""
    name_or_path: str | None = None
    """Hugging Face causal LM: a local directory (a recgpt export included) or a hub name."""
    architecture: str = "gpt2"
    """Preset family: gpt2 (pre-LN) or bart (post-LN decoder, LayerNorm on the embeddings: SASRec's layout)."""
    prompt: str = "ids"
    """Prompt format: ids (item tokens only, SASRec-like) or text (titles and ratings in words)."""
    n_layer: int = 2
    """Transformer layers of a preset model."""
    n_embd: int = 64
    """Hidden size of a preset model."""
    n_head: int = 2
    """Attention heads of a preset model."""
    dropout: float = 0.1
    """Dropout of a preset model (residual, embedding and attention)."""
    tokenizer_vocab_size: int = 2000
    """Size of the word-piece vocabulary trained locally on item titles for preset models."""
    item_init: str = "mean"
    """Initial item-token embeddings: mean (of existing rows), title (of title tokens), random, cooccurrence (PMI SVD)."""
    rating_head: str = "classes"
    """Rating task output: classes (one per rating level) or regression."""
    gradient_checkpointing: bool = False
    """Non-reentrant Hugging Face gradient checkpointing (safe with the adversarial step)."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped with a model directory."""

    def __post_init__(self) -> None:
        _check(
            (self.preset is None) != (self.name_or_path is None),
            "model.preset",
            "set exactly one of model.preset and model.name_or_path (the other null)",
        )
        if self.preset is not None:
            _choice(self.preset, "model.preset", ("tiny", "small", "base"))
        _choice(self.architecture, "model.architecture", ("gpt2", "bart"))
        _choice(self.prompt, "model.prompt", ("ids", "text"))
        _choice(self.item_init, "model.item_init", ("mean", "title", "random", "cooccurrence"))
        _choice(self.rating_head, "model.rating_head", ("classes", "regression"))
        _check(self.n_layer >= 1, "model.n_layer", "must be >= 1")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", "must be divisible by model.n_head")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train PEFT adapters (plus the item-token rows and head) instead of every weight."""
    method: str = "lora"
    """Adapter type: lora, or adalora (ZeRO stage 0 only: it reads parameter .grad)."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | None = None
    """Modules to adapt; null picks them per architecture (GPT-2 c_attn/c_proj/c_fc, Llama q..down_proj)."""

    def __post_init__(self) -> None:
        _choice(self.method, "lora.method", ("lora", "adalora"))
        _check(self.r >= 1, "lora.r", f"got {self.r}, must be >= 1")
        _check(self.alpha >= 1, "lora.alpha", "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")


@dataclass
class AdversarialConfig:
    method: str = "none"
    """Embedding perturbation: none, fgm, pgd or freelb (always on inputs_embeds)."""
    epsilon: float = 1.0
    """Radius of the per-example L2 ball the perturbation stays in."""
    alpha: float = 0.3
    """Ascent step size of pgd / freelb."""
    steps: int = 3
    """Inner ascent steps of pgd / freelb."""
    adv_weight: float = 1.0
    """Weight of the adversarial loss added to the clean loss (fgm, pgd)."""
    init_magnitude: float = 0.1
    """FreeLB random-init radius (fraction of epsilon)."""
    warmup_steps: int = 50
    """Optimizer steps trained clean before perturbation starts (FreeLB diverges from step 0)."""
    eval_epsilon: float = 0.0
    """> 0: also report metrics under an FGM attack of this radius at evaluation."""

    def __post_init__(self) -> None:
        _choice(self.method, "adversarial.method", ("none", "fgm", "pgd", "freelb"))
        _check(self.epsilon > 0, "adversarial.epsilon", "must be > 0")
        _check(self.alpha > 0, "adversarial.alpha", "must be > 0")
        _check(self.steps >= 1, "adversarial.steps", "must be >= 1")
        _check(self.adv_weight >= 0, "adversarial.adv_weight", "must be >= 0")
        _check(self.warmup_steps >= 0, "adversarial.warmup_steps", "must be >= 0")
        _check(self.eval_epsilon >= 0, "adversarial.eval_epsilon", "must be >= 0")


@dataclass
class ZeroConfig:
    stage: int = 0
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1, 2 or 3."""
    offload_optimizer: bool = False
    """Keep optimizer states (and step) on the CPU (stage >= 1)."""
    offload_param: bool = False
    """Keep parameters on the CPU between uses (stage 3 only)."""
    bf16: bool = False
    """bfloat16 mixed precision."""
    fp16: bool = False
    """float16 mixed precision with dynamic loss scaling."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward (stage >= 1; pays off on GPUs)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed keys merged last into the generated JSON (escape hatch; nested dicts merge)."""

    def __post_init__(self) -> None:
        _choice(self.stage, "zero.stage", (0, 1, 2, 3))
        _check(not (self.bf16 and self.fp16), "zero.fp16", "fp16 and bf16 cannot both be true")
        _check(
            not self.offload_optimizer or self.stage >= 1,
            "zero.offload_optimizer",
            "needs zero.stage >= 1",
        )
        _check(not self.offload_param or self.stage == 3, "zero.offload_param", "needs zero.stage 3")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1", "betas must be in [0, 1)")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    """Linear warm-up from 0 to optim.lr over this many optimizer steps."""
    decay: str = "cosine"
    """Decay after warm-up until the last step: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """Learning rate at the last step as a fraction of optim.lr."""

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        _choice(self.decay, "schedule.decay", ("cosine", "linear", "constant"))
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]")


@dataclass
class TrainConfig:
    micro_batch_size: int = 64
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (one backward each)."""
    max_steps: int = 1000
    """Optimizer steps to run (0 = run train.epochs epochs instead)."""
    epochs: int = 0
    """Epochs to run when train.max_steps is 0."""
    objective: str = "all"
    """next_item loss positions: all (every window position), new (each target once, newest window) or last."""
    loss: str = "full"
    """Softmax over items: full, or sampled (train.num_negatives shared negatives; huge catalogues)."""
    num_negatives: int = 1024
    """Shared negative items per batch for loss=sampled."""
    eval_interval: int = 200
    """Evaluate on the valid split every N optimizer steps (0 = only at the end)."""
    checkpoint_interval: int = 200
    """Write a checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    """Complete checkpoints to keep (the best one is kept in addition)."""
    early_stopping_patience: int = 0
    """Stop after N evaluations without improvement of eval.metric (0 = off)."""
    output_dir: str = "runs/train"
    """Run directory on local or shared storage: checkpoints, TensorBoard logs, resolved config."""
    resume: str = "auto"
    """auto (latest complete checkpoint in output_dir, if any), never, or a checkpoint path."""
    max_bad_steps: int = 5
    """Consecutive non-finite losses skipped before the run stops with an error."""
    log_interval: int = 10
    """Log training scalars every N optimizer steps."""

    def __post_init__(self) -> None:
        _check(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.max_steps >= 0 and self.epochs >= 0, "train.max_steps", "must be >= 0")
        _check(
            self.max_steps > 0 or self.epochs > 0,
            "train.max_steps",
            "set train.max_steps or train.epochs > 0",
        )
        _choice(self.objective, "train.objective", ("all", "new", "last"))
        _choice(self.loss, "train.loss", ("full", "sampled"))
        _check(self.num_negatives >= 1, "train.num_negatives", "must be >= 1")
        _check(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
        _check(self.log_interval >= 1, "train.log_interval", "must be >= 1")
        _check(
            self.eval_interval >= 0 and self.checkpoint_interval >= 0, "train.eval_interval", "must be >= 0"
        )
        _check(
            not (self.eval_interval and self.checkpoint_interval)
            or self.checkpoint_interval % self.eval_interval == 0,
            "train.checkpoint_interval",
            f"{self.checkpoint_interval} must be a multiple of train.eval_interval ({self.eval_interval}) "
            "so every checkpoint has validation metrics (best-checkpoint tracking)",
        )


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20])
    """Cut-offs K for HR@K, NDCG@K and MRR@K."""
    exclude_seen: bool = True
    """Mask every item of the user's history out of the ranking."""
    batch_size: int = 128
    """Sequences per rank per evaluation batch."""
    metric: str = "ndcg@10"
    """Validation metric for the best checkpoint and early stopping (higher is better; rating: accuracy)."""

    def __post_init__(self) -> None:
        _check(
            len(self.ks) > 0 and all(k >= 1 for k in self.ks), "eval.ks", "must be a non-empty list of K >= 1"
        )
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files under <output_dir>/tensorboard (rank 0)."""
    progress: str = "auto"
    """Progress display: auto (tqdm on a TTY, plain lines otherwise), tqdm, plain or none."""

    def __post_init__(self) -> None:
        _choice(self.progress, "logging.progress", ("auto", "tqdm", "plain", "none"))


@dataclass
class RayConfig:
    num_workers: int = 0
    """Ray Train workers; 0 runs without Ray (single process or torchrun)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra custom resources per worker (e.g. {accelerator_type:H100: 0.001})."""
    placement_strategy: str = "PACK"
    """Placement group strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    storage_path: str | None = None
    """Shared storage root; the run directory is <storage_path>/<name> (default: train.output_dir's parent)."""
    name: str | None = None
    """Run name under storage_path (default: train.output_dir's basename); re-using it resumes."""
    max_failures: int = 2
    """Worker-group restarts Ray may do before the run fails (-1 = unlimited)."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "ray.num_workers", "must be >= 0")
        _check(self.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0")
        _choice(
            self.placement_strategy,
            "ray.placement_strategy",
            ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        )
        _check(self.max_failures >= -1, "ray.max_failures", "must be >= -1")


@dataclass
class ExportConfig:
    dtype: str = "fp32"
    """Weight dtype of the exported safetensors: fp32, bf16 or fp16."""
    max_shard_size: str = "2GB"
    """Size cap of each safetensors shard."""
    parity_batches: int = 2
    """Held-out batches whose logits must match the unmerged model."""

    def __post_init__(self) -> None:
        _choice(self.dtype, "export.dtype", ("fp32", "bf16", "fp16"))
        _check(self.parity_batches >= 0, "export.parity_batches", "must be >= 0")


@dataclass
class RecGPTConfig:
    task: str = "next_item"
    """next_item (rank every item for the next interaction) or rating (predict the user's rating)."""
    seed: int = 1234
    """Seed for weights, data order and dropout."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        _choice(self.task, "task", ("next_item", "rating"))
        if self.lora.enabled and self.lora.method == "adalora":
            # AdaLoRA's rank allocator reads parameter .grad, which ZeRO >= 1 partitions or keeps in
            # its own buffers: it would silently compute nonsense there.
            _check(
                self.zero.stage == 0, "lora.method", "adalora needs zero.stage 0 (it reads parameter .grad)"
            )
        if self.task == "rating":
            _check(
                self.train.objective == "all", "train.objective", "the rating task supervises every position"
            )
        _check(
            self.eval.metric in _valid_metrics(self),
            "eval.metric",
            f"got {self.eval.metric!r}, allowed: {', '.join(_valid_metrics(self))}",
        )


def _valid_metrics(cfg: RecGPTConfig) -> list[str]:
    if cfg.task == "rating":
        return ["accuracy", "auc", "neg_rmse"]
    return [f"{m}@{k}" for k in cfg.eval.ks for m in ("ndcg", "hr", "mrr")]


# --------------------------------------------------------------------------- loading


def _validate_tree(dc: Any, prefix: str = "") -> None:
    """Re-run every section's __post_init__ (OmegaConf merges bypass them)."""
    for f in dataclasses.fields(dc):
        value = getattr(dc, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, f"{prefix}{f.name}.")
    dc.__post_init__()


def _omegaconf_error_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "config"
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Key '" in msg and "not in" in msg:
        msg = "unknown key"
    return f"{key}: {msg}"


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RecGPTConfig:
    """Defaults <- YAML file (overrides only) <- ``key=value`` overrides; validated.

    Raises :class:`ConfigError` with one line naming the key on any problem.
    """
    schema = OmegaConf.structured(RecGPTConfig)
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file {str(p)!r}")
        try:
            layers.append(OmegaConf.load(p))
        except Exception as e:  # yaml errors carry line numbers
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key=value (e.g. train.max_steps=100)")
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as e:
            raise ConfigError(_omegaconf_error_line(e)) from None
    try:
        merged = OmegaConf.merge(schema, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        line = _omegaconf_error_line(e)
        if path is not None and not any(o.split("=")[0] in line for o in overrides):
            line = f"{path}: {line}"
        raise ConfigError(line) from None
    assert isinstance(cfg, RecGPTConfig)
    _validate_tree(cfg)
    return cfg


def to_dict(cfg: RecGPTConfig) -> dict[str, Any]:
    """Plain nested dict of the resolved config (JSON/YAML-safe)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RecGPTConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_dict(d: dict[str, Any]) -> RecGPTConfig:
    """Rebuild a validated config from a saved resolved-config dict (checkpoints, exports)."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RecGPTConfig), OmegaConf.create(d)))
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_error_line(e)) from None
    _validate_tree(cfg)
    return cfg


def save_resolved(cfg: RecGPTConfig, directory: str | os.PathLike) -> Path:
    """Write ``config.yaml`` (resolved, every key) into ``directory`` atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    target = d / "config.yaml"
    tmp = d / f".config.yaml.tmp{os.getpid()}"
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------- DeepSpeed JSON


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: RecGPTConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the typed config (never kept by hand)."""
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
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.train.micro_batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": z.bf16},
        "fp16": {"enabled": z.fp16, "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, z.extra)


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
