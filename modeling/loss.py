"""Training loss: task loss at the supervised positions, adversarial perturbation included.

``LossComputer(cfg)(model, batch, step)`` returns one scalar for one ``engine.backward`` and a dict of
floats to log. ``model`` is the RecModel or the DeepSpeed engine wrapping it (its forward is called
through the engine; ``embed`` / ``item_logits`` / ``rating_output`` on the module).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from configs import RecGPTConfig
from modeling.adversarial import perturbed_loss
from modeling.model import RecModel


def unwrap(model: nn.Module) -> RecModel:
    """The RecModel inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def sample_negatives(num_items: int, num_negatives: int, device: torch.device) -> torch.Tensor:
    """Shared uniform negatives for a sampled softmax (the global RNG: restored on resume per rank)."""
    return torch.randint(num_items, (num_negatives,), device=device)


def task_loss(
    rec: RecModel, hidden: torch.Tensor, batch: dict[str, torch.Tensor], cfg: RecGPTConfig, negatives=None
) -> torch.Tensor:
    """Mean loss over the supervised positions (``labels != -100``) of the batch.

    next_item: cross-entropy over all items (full softmax), or — with ``negatives`` — over the batch's
    positive items plus the shared negatives (sampled softmax; accidental hits appear once as positive).
    rating: cross-entropy over rating levels, or squared error of the predicted rating (regression).
    """
    where = batch["labels"] != -100
    h = hidden[where]
    y = batch["labels"][where]
    if cfg.task == "rating":
        out = rec.rating_output(h).float()
        if rec.regression:
            return F.mse_loss(out, batch["ratings"][where].float())
        return F.cross_entropy(out, y)
    if negatives is None:
        return F.cross_entropy(rec.item_logits(h).float(), y)
    candidates, inverse = torch.unique(torch.cat([y, negatives]), return_inverse=True)
    return F.cross_entropy(rec.item_logits(h, items=candidates).float(), inverse[: y.numel()])


class LossComputer:
    """Clean task loss, or the adversarial one (``cfg.adversarial``) once ``step >= warmup_steps``."""

    def __init__(self, cfg: RecGPTConfig) -> None:
        self.cfg = cfg

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, rec = self.cfg, unwrap(model)
        mask = batch["attention_mask"]
        negatives = None
        if cfg.task == "next_item" and cfg.train.loss == "sampled":
            negatives = sample_negatives(rec.num_items, cfg.train.num_negatives, mask.device)

        def loss_at(inputs_embeds: torch.Tensor, runner: nn.Module = model) -> torch.Tensor:
            hidden = runner(attention_mask=mask, inputs_embeds=inputs_embeds)
            return task_loss(rec, hidden, batch, cfg, negatives)

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
