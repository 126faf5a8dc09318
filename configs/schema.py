"""Every setting of recgpt, with its default, in one typed place (the bottom layer).

Two roots: :class:`RecGPTConfig` (training, evaluation, export — ``recgpt train --config FILE``) and
:class:`ShardsConfig` (``recgpt shards build``; its CLI flags are generated from its fields). Each
field has exactly one default and one docstring here; YAML files in ``configs/`` hold only overrides,
and ``key=value`` dotlist overrides apply last (:mod:`configs.load`). Unknown keys, wrong types and
impossible combinations raise :class:`~configs.errors.ConfigError` with one line naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Any

from configs.errors import ConfigError

# Shapes of the preset models (model.n_layer / n_embd / n_head override them one by one).
PRESET_SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2),
    "small": dict(n_layer=4, n_embd=256, n_head=4),
    "base": dict(n_layer=12, n_embd=768, n_head=12),
}
# Leave-one-out needs one training item, the valid target and the test target.
MIN_USER_INTERACTIONS = 3
TIME_UNITS = ("s", "ms", "us", "ns")  # epoch units, coarsest first
DUPLICATES = ("drop", "keep", "error")
# `shards build` engines: local = the columnar one (data_shards/columnar.py), python = the reference path,
# ray = the columnar steps as a Ray Data pipeline (launcher/ray_shards.py, data_shards/partitioned.py).
BUILD_ENGINES = ("local", "python", "ray")
INPUT_FORMATS = (
    "auto",
    "ml-100k",
    "ml-1m",
    "ml-latest",
    "amazon-2018",
    "amazon-2023",
    "csv",
    "parquet",
    "jsonl",
    "s3rec",
    "sasrec",
)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}, allowed: {', '.join(map(str, allowed))}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (``name: type = default`` then ``\"\"\"doc\"\"\"``).

    Read from the class source with :mod:`ast`, so the docstring in this file is the one text shown by
    ``--help``, the docs and error hints.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# --------------------------------------------------------------------------- recgpt shards build


@dataclass
class ShardsConfig:
    """How ``recgpt shards build`` turns interaction logs into a leave-one-out split of WebDataset shards."""

    format: str = "auto"
    """Input format: auto (detected from file names and contents), ml-100k, ml-1m, ml-latest, amazon-2018,
    amazon-2023, csv, parquet, jsonl (JSON lines with the generic column mapping), s3rec (``user item
    item ...`` per line) or sasrec (``user item`` per line): in the academic sequence formats the position
    in the file is the time order."""
    meta: str | None = None
    """Item metadata file (Amazon meta JSONL; titles) when it is not next to the input."""
    user_col: str = "user_id"
    """Generic CSV/Parquet/JSONL: the user column."""
    item_col: str = "item_id"
    """Generic CSV/Parquet/JSONL: the item column."""
    rating_col: str | None = None
    """Generic CSV/Parquet/JSONL: the rating column (null: every rating is 1)."""
    time_col: str = "timestamp"
    """Generic CSV/Parquet/JSONL: the timestamp column: epoch numbers (decimals kept exactly), ISO 8601
    strings (UTC offsets applied; none = UTC) or a Parquet timestamp column."""
    time_unit: str = "auto"
    """Unit of numeric timestamps: s, ms, us, ns, or auto: the format's (MovieLens and Amazon 2018 s,
    Amazon 2023 ms), else from the largest value (< 1e11 s, < 1e14 ms, < 1e17 us, else ns)."""
    title_col: str | None = None
    """Generic CSV/Parquet/JSONL: the item title column (optional)."""
    duplicates: str = "drop"
    """Rows repeating an earlier row's user, item and timestamp: drop (counted; the first is kept),
    keep (each row is an interaction), or error (stop naming the first one)."""
    min_user_interactions: int = 5
    """k-core: users with fewer interactions are dropped (repeated until stable with the item minimum)."""
    min_item_interactions: int = 1
    """k-core: items with fewer interactions are dropped."""
    rating_threshold: float | None = None
    """Keep only interactions rated at least this (null: keep all)."""
    max_history: int = 50
    """History items per record: training windows hold max_history + 1 items, eval records max_history
    items before the target. data.max_history of a training run may be shorter, never longer."""
    window_stride: int | None = None
    """Training windows end every N items (null = max_history: each target once; smaller overlaps)."""
    prefix_records: bool = False
    """One training record per target (RecBole style, ~50x the compute of windows)."""
    records_per_member: int = 256
    """Records packed into one tar member (a tar header costs ~1 KiB per member)."""
    max_shard_mb: float = 16.0
    """Size cap of one shard file in MiB."""
    skip_bad_lines: bool = False
    """Count and report malformed input lines and lines missing a value instead of stopping at the first."""
    base: str | None = None
    """Periodic builds: the shard directory (or URL) of the previous period. The input then holds only
    the interactions after it; old items keep their index, new ones are appended, every user's history
    continues from the base, and valid/test are each user's last two interactions of the new period."""
    carry_base_train: bool = True
    """With shards.base: also write the base's training records into the new train split (the new
    shards then hold every period, for from-scratch training); false: only the new targets (re-tuning)."""
    engine: str = "local"
    """Build engine: local (columnar: DuckDB sorts, counts and joins with bounded memory, spilling to
    disk; numpy/Arrow assemble the windows and their JSON; no per-row Python), ray (the same steps as a
    Ray Data pipeline on RAY_ADDRESS's cluster or a local Ray: Parquet logs, local or s3://, are read by
    the workers), or python (the reference pandas/Python path). All write the same shards; periodic
    builds (shards.base) use the reference path, and inputs the columnar readers do not take (see
    README) its readers."""
    engine_threads: int = 0
    """Threads of the local engine's DuckDB (0 = every core); with engine=ray, the CPUs of the local Ray
    it starts (0 = every core; ignored when RAY_ADDRESS names a cluster)."""
    engine_memory_gb: float = 2.0
    """Memory limit of the local engine's DuckDB in GiB (it spills to a temporary directory beyond it);
    the engine's numpy columns come on top (peak RSS 3.7 GiB for 50M interactions at 2 GiB)."""

    def __post_init__(self) -> None:
        _choice(self.format, "shards.format", INPUT_FORMATS)
        _choice(self.time_unit, "shards.time_unit", ("auto", *TIME_UNITS))
        _choice(self.duplicates, "shards.duplicates", DUPLICATES)
        _choice(self.engine, "shards.engine", BUILD_ENGINES)
        _check(self.engine_threads >= 0, "shards.engine_threads", f"got {self.engine_threads}, must be >= 0")
        _check(
            self.engine_memory_gb >= 0.1,
            "shards.engine_memory_gb",
            f"got {self.engine_memory_gb:g}, must be >= 0.1",
        )
        _check(
            self.min_user_interactions >= MIN_USER_INTERACTIONS,
            "shards.min_user_interactions",
            f"got {self.min_user_interactions}, leave-one-out needs >= {MIN_USER_INTERACTIONS}",
        )
        _check(
            self.min_item_interactions >= 1,
            "shards.min_item_interactions",
            f"got {self.min_item_interactions}, must be >= 1",
        )
        _check(self.max_history >= 1, "shards.max_history", f"got {self.max_history}, must be >= 1")
        _check(
            self.window_stride is None or 1 <= self.window_stride <= self.max_history,
            "shards.window_stride",
            f"got {self.window_stride}, must be in 1..shards.max_history ({self.max_history})",
        )
        _check(
            self.records_per_member >= 1,
            "shards.records_per_member",
            f"got {self.records_per_member}, must be >= 1",
        )
        # Two tar records (20 KiB) is the smallest tar file holding one member.
        _check(
            self.max_shard_mb * 2**20 >= 2 * 10240,
            "shards.max_shard_mb",
            f"got {self.max_shard_mb:g}, must hold at least one tar member (>= 0.02)",
        )

    @property
    def max_shard_bytes(self) -> int:
        return int(self.max_shard_mb * 2**20)


# --------------------------------------------------------------------------- recgpt train / evaluate / export


@dataclass
class DataConfig:
    shards: str = "runs/shards/ml-latest-small"
    """The shard directory (or URL prefix webdataset can open) holding manifest.json."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = read in the training process)."""
    max_history: int | None = None
    """Items of history fed to the model (the most recent ones); null = the shards' window
    (``shards.max_history`` in the manifest). It may be shorter than the shards' window, never longer."""
    corrupt_shard_tolerance: int = 0
    """How many corrupt shards a run may skip (logged) before it stops; 0 = stop at the first."""
    prefetch_factor: int = 4
    """Batches each DataLoader worker prepares ahead."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.max_history is None or self.max_history >= 1, "data.max_history", "must be >= 1")
        _check(self.corrupt_shard_tolerance >= 0, "data.corrupt_shard_tolerance", "must be >= 0")


@dataclass
class ModelConfig:
    preset: str | None = "tiny"
    """Random-init decoder-only transformer built locally: tiny (2 layers x 64), small (4 x 256) or
    base (12 x 768, GPT-2-small sized); null to load model.name_or_path instead."""
    name_or_path: str | None = None
    """Hugging Face causal LM: a local directory (a recgpt export included) or a hub name."""
    architecture: str = "gpt2"
    """Block layout of a preset: gpt2 (pre-LN blocks, GPT-2), bart (post-LN blocks with LayerNorm on the
    embeddings, SASRec's layout; built from Hugging Face's BART decoder) or ligr (eSASRec's LiGR blocks:
    pre-LN with a sigmoid gate on each residual branch and a SwiGLU FFN; modeling/ligr.py)."""
    prompt: str = "ids"
    """Prompt format: ids (item tokens only, SASRec-like) or text (titles and ratings in words)."""
    n_layer: int | None = None
    """Transformer layers of a preset model; null = the preset's (see PRESET_SHAPES)."""
    n_embd: int | None = None
    """Hidden size of a preset model; null = the preset's."""
    n_head: int | None = None
    """Attention heads of a preset model; null = the preset's."""
    ffn_multiplier: float | None = None
    """FFN hidden size of a preset model as a multiple of model.n_embd (rounded); null = 4 for gpt2 and
    bart (GELU, two matrices), 2 for ligr (SwiGLU, three matrices: a ligr block then has a GPT-2
    block's weight count, gates included; eSASRec used 1-2)."""
    dropout: float = 0.1
    """Dropout of a preset model (residual, embedding and attention; ligr also inside its FFN)."""
    tokenizer_vocab_size: int = 2000
    """Size of the byte-level BPE vocabulary trained locally on item titles for preset models."""
    item_init: str = "mean"
    """Initial item-token embeddings: mean (of existing rows), title (of title tokens), random, cooccurrence (PMI SVD)."""
    rating_head: str = "classes"
    """Rating task output: classes (one per rating level) or regression."""
    gradient_checkpointing: bool = False
    """Non-reentrant Hugging Face gradient checkpointing (safe with the adversarial step)."""
    trainable_layers: int | None = None
    """Freeze tuning: train only the top N transformer blocks plus the item-token rows (PEFT trainable
    tokens, as under LoRA), the head's item rows and the rating head; every other weight (lower blocks,
    other token rows, positions, final norm) stays frozen. 0 = item rows and heads only; null = full
    tuning. Not with lora.enabled; N may not exceed the model's block count."""
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
        _choice(self.architecture, "model.architecture", ("gpt2", "bart", "ligr"))
        _choice(self.prompt, "model.prompt", ("ids", "text"))
        _choice(self.item_init, "model.item_init", ("mean", "title", "random", "cooccurrence"))
        _choice(self.rating_head, "model.rating_head", ("classes", "regression"))
        if self.preset is None:
            for key in ("n_layer", "n_embd", "n_head", "ffn_multiplier"):
                _check(
                    getattr(self, key) is None,
                    f"model.{key}",
                    "only for presets (model.name_or_path sets its own)",
                )
        else:
            shape = self.shape()
            _check(
                shape["n_layer"] >= 1 and shape["n_head"] >= 1,
                "model.n_layer",
                "layers and heads must be >= 1",
            )
            _check(
                shape["n_embd"] % shape["n_head"] == 0, "model.n_embd", "must be divisible by model.n_head"
            )
            _check(
                self.ffn_multiplier is None or self.ffn_size() >= 1,
                "model.ffn_multiplier",
                f"got {self.ffn_multiplier}, must give an FFN of at least 1 unit (> 0)",
            )
            _check(
                self.trainable_layers is None or self.trainable_layers <= shape["n_layer"],
                "model.trainable_layers",
                f"got {self.trainable_layers}, but the model has {shape['n_layer']} layers (model.n_layer)",
            )
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(
            self.trainable_layers is None or self.trainable_layers >= 0,
            "model.trainable_layers",
            f"got {self.trainable_layers}, must be >= 0 (null = full tuning)",
        )

    def shape(self) -> dict[str, int]:
        """n_layer / n_embd / n_head of the preset, each overridden by the field when it is set."""
        base = PRESET_SHAPES[self.preset or "tiny"]
        return {k: base[k] if getattr(self, k) is None else getattr(self, k) for k in base}

    def ffn_size(self) -> int:
        """FFN hidden size of a preset: ``model.ffn_multiplier`` (or the architecture's default) x n_embd."""
        multiplier = self.ffn_multiplier
        if multiplier is None:
            multiplier = 2.0 if self.architecture == "ligr" else 4.0
        return round(multiplier * self.shape()["n_embd"])


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
    """Modules to adapt; null picks them per architecture (GPT-2 c_attn/c_proj/c_fc, Llama and ligr
    q_proj..down_proj, BART q_proj..fc2)."""

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
    overlap_comm: bool = False
    """Overlap gradient reduction with backward (stage >= 1; pays off on GPUs)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed keys merged last into the generated JSON (escape hatch; nested dicts merge)."""

    def __post_init__(self) -> None:
        _choice(self.stage, "zero.stage", (0, 1, 2, 3))
        _check(
            not self.offload_optimizer or self.stage >= 1,
            "zero.offload_optimizer",
            "needs zero.stage >= 1",
        )
        _check(not self.offload_param or self.stage == 3, "zero.offload_param", "needs zero.stage 3")


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: adamw, or sgd (with momentum; Nesterov by default). Both get the same LR schedule,
    gradient clipping and param groups; each ignores the other's settings (beta1/beta2/eps are AdamW's,
    momentum/nesterov SGD's)."""
    lr: float = 1e-3
    """Peak learning rate (SGD typically needs a far larger one than AdamW)."""
    weight_decay: float = 0.01
    """Weight decay, not applied to biases and norms: decoupled under adamw, L2 added to the gradient
    under sgd."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    momentum: float = 0.9
    """SGD momentum (0 = plain SGD)."""
    nesterov: bool = True
    """SGD with Nesterov momentum (needs momentum > 0)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""

    def __post_init__(self) -> None:
        _choice(self.name, "optim.name", ("adamw", "sgd"))
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1", "betas must be in [0, 1)")
        _check(0 <= self.momentum < 1, "optim.momentum", f"got {self.momentum}, must be in [0, 1)")
        if self.name == "sgd":
            _check(
                not self.nesterov or self.momentum > 0,
                "optim.nesterov",
                "Nesterov momentum needs optim.momentum > 0 (or optim.nesterov=false)",
            )
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    """Linear warm-up from 0 to optim.lr over this many optimizer steps."""
    decay: str = "cosine"
    """Decay after warm-up until the last step: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """Learning rate the schedule decays to (reached after the last step) as a fraction of optim.lr."""

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        _choice(self.decay, "schedule.decay", ("cosine", "linear", "constant"))
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]")


@dataclass
class TrainConfig:
    precision: str = "fp32"
    """Training precision: fp32, bf16 (bfloat16 mixed precision) or fp16 (float16 with dynamic loss scaling)."""
    micro_batch_size: int = 64
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (one backward each)."""
    keep_global_batch: bool = True
    """On a resume at another world size, keep the checkpoint's global batch (micro-batch size x
    accumulation steps re-chosen per rank; refused when it cannot be split); false: use
    micro_batch_size x grad_accum x the new world size as configured."""
    max_steps: int = 1000
    """Optimizer steps to run (0 = run train.epochs epochs instead)."""
    epochs: int = 0
    """Epochs to run when train.max_steps is 0."""
    objective: str = "all"
    """next_item loss positions: all (every window position), new (each target once, newest window) or last."""
    loss: str = "full"
    """next_item loss: full (softmax over every item), sampled (softmax over the batch's positives plus
    train.num_negatives shared sampled negatives: a step cost that does not grow with the catalogue) or
    gbce (gSASRec's generalised binary cross-entropy over the positive and train.num_negatives uniform
    negatives, Petrov & Macdonald, RecSys 2023)."""
    num_negatives: int = 1024
    """Shared negative items per batch for loss=sampled and loss=gbce."""
    negative_sampler: str = "uniform"
    """Distribution of the sampled negatives (loss=sampled): uniform, or popularity (proportional to
    each item's interaction count in items.jsonl: more hard negatives from the head of the catalogue)."""
    logq_correction: bool = True
    """loss=sampled: subtract log P(the item is a candidate) from every candidate's logit (candidates:
    the in-batch positives, drawn by popularity, plus the negatives drawn by train.negative_sampler), so
    the sampled softmax estimates the full one without popularity bias (logQ correction: Bengio &
    Senecal 2008; Yi et al., RecSys 2019, for in-batch negatives)."""
    gbce_t: float = 0.75
    """loss=gbce: calibration t in [0, 1] (0: plain BCE, 1: fully calibrated to the full softmax)."""
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
    init_from: str | None = None
    """Warm start a new run from an export directory or a checkpoint (run or checkpoint directory; local
    or an object-store URL): its weights, item rows copied by item id, items new to these shards
    initialised by model.item_init; fresh optimizer, schedule and step 0. Same model as the source (LoRA may differ). A crashed
    warm-started run resumes from its own checkpoints (train.resume=auto)."""
    max_bad_steps: int = 5
    """Consecutive optimizer steps with a non-finite (NaN/inf) loss in some micro-batch on some rank before
    the run stops with an error. Such a micro-batch adds no gradient (its backward runs with the gradients
    zeroed); the rest of its step counts."""
    log_interval: int = 10
    """Log training scalars every N optimizer steps."""
    keep_freed_memory: bool = True
    """glibc: keep the memory a step frees for the next step (fixed malloc mmap and trim thresholds)
    instead of returning it to the OS and faulting it in again. Measured on CPU with the text format of
    the throughput benchmark: 4-8K page faults a step -> ~100, 5-10 % of the step's CPU time; blocks
    above 32 MiB (e.g. full-softmax logits of a large batch) are still mapped afresh, so the ids
    benchmark gains nothing. The process's resident memory stays at its peak. Not glibc: no effect (the
    log says so). (trainer.monitor.keep_freed_memory) false: glibc's defaults."""

    def __post_init__(self) -> None:
        _choice(self.precision, "train.precision", ("fp32", "bf16", "fp16"))
        _check(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check(self.epochs >= 0, "train.epochs", "must be >= 0")
        _check(
            self.max_steps > 0 or self.epochs > 0,
            "train.max_steps",
            "set train.max_steps or train.epochs > 0",
        )
        _choice(self.objective, "train.objective", ("all", "new", "last"))
        _choice(self.loss, "train.loss", ("full", "sampled", "gbce"))
        _check(self.num_negatives >= 1, "train.num_negatives", "must be >= 1")
        _choice(self.negative_sampler, "train.negative_sampler", ("uniform", "popularity"))
        _check(0.0 <= self.gbce_t <= 1.0, "train.gbce_t", "must be in [0, 1]")
        _check(
            not (self.loss == "gbce" and self.negative_sampler != "uniform"),
            "train.negative_sampler",
            "loss=gbce calibrates for uniform negatives only",
        )
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
    item_chunk: int = 65536
    """Items scored at a time in full-ranking evaluation: memory eval.batch_size x item_chunk floats,
    whatever the catalogue size (the metrics are exact; see modeling.metrics.chunked_target_ranks)."""
    max_users: int | None = None
    """Score only the first N users of the valid/test split (one record per user, in the shards' written
    order) — in validation during training, recgpt evaluate and the export's parity check: a bounded,
    repeatable sample for quick checks and benchmarks (full ranking of millions of users over a 1M-item
    catalogue takes hours on a CPU). null = every user; metrics over a prefix are not the split's."""

    def __post_init__(self) -> None:
        _check(
            len(self.ks) > 0 and all(k >= 1 for k in self.ks), "eval.ks", "must be a non-empty list of K >= 1"
        )
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.item_chunk >= 1, "eval.item_chunk", "must be >= 1")
        _check(self.max_users is None or self.max_users >= 1, "eval.max_users", "must be null or >= 1")


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
    num_workers: int | list[int] = 0
    """Ray Train workers; 0 runs without Ray (single process or torchrun). A range [min, max] (1 <= min <=
    max) makes the group elastic (Ray Train's ScalingConfig(num_workers=(min, max))): Ray starts as many
    as the cluster holds, at least min, and a group restarted after a failure may come back smaller."""
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
        n = self.num_workers
        if isinstance(n, (list, tuple)):  # OmegaConf gives a list; Python callers may pass a tuple
            _check(
                len(n) == 2 and 1 <= n[0] <= n[1],
                "ray.num_workers",
                f"got {list(n)}, a range is [min, max] with 1 <= min <= max",
            )
        else:
            _check(n >= 0, "ray.num_workers", "must be >= 0")
        _check(self.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0")
        _choice(
            self.placement_strategy,
            "ray.placement_strategy",
            ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        )
        _check(self.max_failures >= -1, "ray.max_failures", "must be >= -1")

    @property
    def worker_range(self) -> tuple[int, int]:
        """``(min, max)`` Ray Train workers: ``(n, n)`` for a fixed ``num_workers: n`` (0: no Ray)."""
        n = self.num_workers
        return (n[0], n[1]) if isinstance(n, (list, tuple)) else (n, n)

    @property
    def max_workers(self) -> int:
        """The most workers the run may have; 0 runs without Ray."""
        return self.worker_range[1]

    @property
    def elastic(self) -> bool:
        """Whether ``num_workers`` is a [min, max] range (Ray Train's elastic scaling)."""
        return isinstance(self.num_workers, (list, tuple))


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
    """The shards to train on and how they are read."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The causal LM (a preset or any HF model) and its item tokens."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """PEFT adapters instead of full tuning (model.trainable_layers: freeze tuning)."""
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    """Perturbation of inputs_embeds during training (and the eval-time attack)."""
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    """DeepSpeed ZeRO stage and offload."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer (AdamW or SGD), its settings and gradient clipping."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate warm-up and decay."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batches, precision, steps, loss, intervals and the run directory."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Full-ranking evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """TensorBoard and progress output."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray Train launch (ray.num_workers > 0)."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Merged safetensors export."""

    def __post_init__(self) -> None:
        _choice(self.task, "task", ("next_item", "rating"))
        if self.lora.enabled and self.lora.method == "adalora":
            # AdaLoRA's rank allocator reads parameter .grad, which ZeRO >= 1 partitions or keeps in
            # its own buffers: it would silently compute nonsense there.
            _check(
                self.zero.stage == 0, "lora.method", "adalora needs zero.stage 0 (it reads parameter .grad)"
            )
        _check(
            not (self.lora.enabled and self.model.trainable_layers is not None),
            "model.trainable_layers",
            "freeze tuning and lora.enabled exclude each other (set one of them)",
        )
        if self.task == "rating":
            _check(
                self.train.objective == "all", "train.objective", "the rating task supervises every position"
            )
        _check(
            self.train.init_from is None or self.train.resume in ("auto", "never"),
            "train.init_from",
            f"starts a new run from weights, train.resume={self.train.resume!r} continues a checkpoint; set "
            "one of them (a warm-started run resumes its own checkpoints with train.resume=auto)",
        )
        _check(
            self.eval.metric in valid_metrics(self),
            "eval.metric",
            f"got {self.eval.metric!r}, allowed: {', '.join(valid_metrics(self))}",
        )


def valid_metrics(cfg: RecGPTConfig) -> list[str]:
    """The metric names eval.metric may take for this config."""
    if cfg.task == "rating":
        return ["accuracy", "auc", "neg_rmse"]
    return [f"{m}@{k}" for k in cfg.eval.ks for m in ("ndcg", "hr", "mrr")]


def validate_tree(dc: Any) -> None:
    """Re-run every section's ``__post_init__`` (OmegaConf merges bypass them), innermost first."""
    for f in dataclasses.fields(dc):
        value = getattr(dc, f.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value)
    dc.__post_init__()
