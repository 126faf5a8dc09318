"""Training loss: task loss at the supervised positions, adversarial perturbation included.

``LossComputer(cfg)(model, batch, step, denominator)`` returns one scalar for one ``engine.backward``
and a dict of floats to log. ``model`` is the RecModel or the DeepSpeed engine wrapping it (its forward
is called through the engine; ``embed`` / ``item_logits`` / ``rating_output`` on the module).

Weighting: the loss is the SUM of the per-position losses of the micro-batch divided by
``denominator``. Alone (``denominator=None``) that is the batch's own count of supervised positions:
the plain mean. The training loop passes ``N / (grad_accum x world_size)``, N the supervised positions
of the whole optimizer step on every rank (:func:`step_denominator`): DeepSpeed divides each
micro-batch's gradient by ``grad_accum`` and averages over ranks, which leaves exactly
``sum over every position of the step / N`` — every supervised position weighs the same, however the
step's sequences are split into micro-batches and ranks (a mean per micro-batch would weigh a position
of a micro-batch with few supervised positions more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from configs import RecGPTConfig
from data_shards.records import IGNORE_INDEX
from modeling.adversarial import perturbed_loss
from modeling.model import RecModel


def unwrap(model: nn.Module) -> RecModel:
    """The RecModel inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def sample_negatives(num_items: int, num_negatives: int, device: torch.device) -> torch.Tensor:
    """Shared uniform negatives for a sampled softmax (the global RNG: restored on resume per rank)."""
    return torch.randint(num_items, (num_negatives,), device=device)


def supervised_positions(batch: dict[str, torch.Tensor]) -> int:
    """Positions of ``batch`` that carry a label (``labels != IGNORE_INDEX``): what the loss sums over."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def step_denominator(positions: int, grad_accum: int, world_size: int) -> float:
    """The ``denominator`` of every micro-batch of an optimizer step that has ``positions`` supervised
    positions over all its micro-batches and ranks: ``N / (grad_accum x world_size)``, undoing DeepSpeed's
    division by the accumulation count and its average over ranks (module docstring). A step without
    any supervised position (no data can do that; guarded anyway) gets 1: its losses are all 0."""
    return max(positions, 1) / (grad_accum * world_size)


def task_loss(
    rec: RecModel,
    hidden: torch.Tensor,
    batch: dict[str, torch.Tensor],
    cfg: RecGPTConfig,
    negatives=None,
    denominator: float | None = None,
) -> torch.Tensor:
    """Sum of the losses at the supervised positions (``labels != IGNORE_INDEX``) / ``denominator``
    (None: their count, i.e. the mean; a batch without any gives 0).

    next_item: cross-entropy over all items (full softmax), or — with ``negatives`` — over the batch's
    positive items plus the shared negatives (sampled softmax; accidental hits appear once as positive).
    rating: cross-entropy over rating levels, or squared error of the predicted rating (regression).
    """
    where = batch["labels"] != IGNORE_INDEX
    h = hidden[where]
    y = batch["labels"][where]
    if cfg.task == "rating":
        out = rec.rating_output(h).float()
        if rec.regression:
            total = F.mse_loss(out, batch["ratings"][where].float(), reduction="sum")
        else:
            total = F.cross_entropy(out, y, reduction="sum")
    elif negatives is None:
        total = F.cross_entropy(rec.item_logits(h).float(), y, reduction="sum")
    else:
        candidates, inverse = torch.unique(torch.cat([y, negatives]), return_inverse=True)
        logits = rec.item_logits(h, items=candidates).float()
        total = F.cross_entropy(logits, inverse[: y.numel()], reduction="sum")
    return total / (max(y.numel(), 1) if denominator is None else denominator)


class LossComputer:
    """Clean task loss, or the adversarial one (``cfg.adversarial``) once ``step >= warmup_steps``."""

    def __init__(self, cfg: RecGPTConfig) -> None:
        self.cfg = cfg

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, denominator: float | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to backward and its logs; every loss term (clean, adversarial, each FreeLB path
        point) is a sum over the supervised positions / ``denominator`` (module docstring), and so is
        each logged loss value (``loss``, ``clean_loss``, ``adv_loss``)."""
        cfg, rec = self.cfg, unwrap(model)
        mask = batch["attention_mask"]
        negatives = None
        if cfg.task == "next_item" and cfg.train.loss == "sampled":
            negatives = sample_negatives(rec.num_items, cfg.train.num_negatives, mask.device)

        def loss_at(inputs_embeds: torch.Tensor, runner: nn.Module = model) -> torch.Tensor:
            hidden = runner(attention_mask=mask, inputs_embeds=inputs_embeds)
            return task_loss(rec, hidden, batch, cfg, negatives, denominator)

        def probe_loss_at(inputs_embeds: torch.Tensor) -> torch.Tensor:
            # Ascent steps run the bare module: a DeepSpeed engine's forward hooks its outputs to
            # start a training backward (ZeRO gradient reduction), which autograd.grad would trigger.
            return loss_at(inputs_embeds, rec)

        embeds = rec.embed(batch["input_ids"])
        acfg = cfg.adversarial
        if acfg.method == "none" or step < acfg.warmup_steps:
            loss = loss_at(embeds)
            value = float(loss.detach())
            return loss, {"loss": value, "clean_loss": value, "adv_loss": 0.0, "perturbation_norm": 0.0}
        return perturbed_loss(loss_at, probe_loss_at, embeds, mask, acfg)
