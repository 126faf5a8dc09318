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
of a micro-batch with few supervised positions more). The training loop waits for N (its step collective,
started before the forward) only after the step's first forward: it asks for the sums
(``denominator=1.0``) and divides the loss and its logs afterwards (:func:`divide`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from configs import ConfigError, RecGPTConfig
from data_shards.records import IGNORE_INDEX
from modeling.adversarial import perturbed_loss
from modeling.model import RecModel


def unwrap(model: nn.Module) -> RecModel:
    """The RecModel inside a DeepSpeed engine (or the model itself)."""
    return getattr(model, "module", model)


def sample_negatives(
    num_items: int, num_negatives: int, device: torch.device, probs: torch.Tensor | None = None
) -> torch.Tensor:
    """``num_negatives`` shared negative item indices (int64 [num_negatives]), drawn with replacement
    uniformly or from ``probs`` ([num_items], summing to 1), with the global RNG (restored per rank on
    resume)."""
    if probs is None:
        return torch.randint(num_items, (num_negatives,), device=device)
    return torch.multinomial(probs, num_negatives, replacement=True)


def popularity(counts: list[int] | None, num_items: int) -> torch.Tensor | None:
    """Item popularity as probabilities (float32 [num_items]) from interaction counts (``count`` in
    items.jsonl; each clipped at 1), or None when the counts are missing (shards of older builds)."""
    if not counts or len(counts) != num_items:
        return None
    c = torch.tensor(counts, dtype=torch.float64).clamp_min(1.0)
    return (c / c.sum()).float()


def supervised_positions(batch: dict[str, torch.Tensor]) -> int:
    """Positions of ``batch`` that carry a label (``labels != IGNORE_INDEX``): what the loss sums over."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def step_denominator(positions: int, grad_accum: int, world_size: int) -> float:
    """The ``denominator`` of every micro-batch of an optimizer step that has ``positions`` supervised
    positions over all its micro-batches and ranks: ``N / (grad_accum x world_size)``, undoing DeepSpeed's
    division by the accumulation count and its average over ranks (module docstring). A step without
    any supervised position (no data can do that; guarded anyway) gets 1: its losses are all 0."""
    return max(positions, 1) / (grad_accum * world_size)


def check_num_negatives(cfg: RecGPTConfig, num_items: int, shards: object) -> None:
    """Refuse ``train.num_negatives`` >= the catalogue's ``num_items`` for the sampled losses (ConfigError
    naming the key): the draws (with replacement) would score nearly every item at a sampled loss's extra
    cost, and gBCE's calibration assumes fewer negatives than items (alpha = k / (N - 1) <= 1)."""
    k = cfg.train.num_negatives
    if cfg.task == "next_item" and cfg.train.loss in ("sampled", "gbce") and k >= num_items:
        raise ConfigError(
            f"train.num_negatives: {k} is not below the {num_items:,} items of {shards}; use fewer "
            "negatives, or train.loss=full to score every item"
        )


LOSS_LOGS = ("loss", "clean_loss", "adv_loss")
"""The logged values of :class:`LossComputer` that are losses, i.e. sums / ``denominator`` (the others,
``perturbation_norm``, are not)."""


def divide(
    loss: torch.Tensor, logs: dict[str, float], denominator: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """``LossComputer(...)(..., denominator=1.0)``'s loss and logs divided by ``denominator``, once it is
    known. The loss of the clean task is bitwise the one ``denominator`` passed in gives (x / 1 is x); an
    adversarial loss (clean + w x adv, a path mean) and the logged values equal it up to rounding (they
    divide the combination instead of each term, the float instead of the tensor)."""
    return loss / denominator, {k: v / denominator if k in LOSS_LOGS else v for k, v in logs.items()}


def task_loss(
    rec: RecModel,
    hidden: torch.Tensor,
    batch: dict[str, torch.Tensor],
    cfg: RecGPTConfig,
    negatives=None,
    denominator: float | None = None,
    log_expected: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sum of the losses at the supervised positions (``labels != IGNORE_INDEX``) / ``denominator``
    (None: their count, i.e. the mean; a batch without any gives 0).

    next_item, by ``train.loss``:

    * full: cross-entropy over all items;
    * sampled (``negatives`` given): cross-entropy over the candidates = the batch's positive items
      (in-batch negatives for the other positions) plus the shared ``negatives``, each candidate once
      (an accidental hit is the positive). With ``log_expected`` ([num_items], float32: log of each
      item's probability of being a candidate, :meth:`LossComputer.log_inclusion`; or a function of the
      candidates' indices giving theirs, which is what training passes) it is subtracted
      from every candidate's logit — the logQ correction;
    * gbce (``negatives`` given, uniform): gSASRec's generalised BCE, ``-beta log sigmoid(s+) - sum log
      sigmoid(-s-)`` per position, ``beta = alpha (t (1 - 1/alpha) + 1/alpha)``, ``alpha = k / (N - 1)``
      (k negatives, N items, t = ``train.gbce_t``; Petrov & Macdonald, RecSys 2023, eq. 9); a negative
      equal to the position's positive is left out.

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
    elif cfg.train.loss == "gbce":
        candidates = torch.cat([y, negatives]).unique()  # sorted: columns found by searchsorted
        logits = rec.item_logits(h, items=candidates).float()
        pos_col = torch.searchsorted(candidates, y)
        neg_col = torch.searchsorted(candidates, negatives)
        pos = logits.gather(1, pos_col[:, None]).squeeze(1)
        neg = logits[:, neg_col]  # [P, k]
        k, n = negatives.numel(), rec.num_items
        alpha = k / max(n - 1, 1)
        t = cfg.train.gbce_t
        beta = alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)
        hit = negatives[None, :] == y[:, None]
        total = -(beta * F.logsigmoid(pos)).sum() - F.logsigmoid(-neg).masked_fill(hit, 0.0).sum()
    else:
        candidates, inverse = torch.unique(torch.cat([y, negatives]), return_inverse=True)
        logits = rec.item_logits(h, items=candidates).float()
        if log_expected is not None:
            logits = logits - (
                log_expected(candidates) if callable(log_expected) else log_expected[candidates]
            )
        total = F.cross_entropy(logits, inverse[: y.numel()], reduction="sum")
    return total / (max(y.numel(), 1) if denominator is None else denominator)


class LossComputer:
    """Clean task loss, or the adversarial one (``cfg.adversarial``) once ``step >= warmup_steps``."""

    def __init__(self, cfg: RecGPTConfig, item_counts: list[int] | None = None) -> None:
        """``item_counts``: interactions per item (``count`` of items.jsonl, by item index), for the
        popularity sampler and the logQ correction; without them both fall back to uniform."""
        self.cfg = cfg
        self.item_counts = item_counts
        self._probs: dict[str, torch.Tensor | None] = {}
        if cfg.train.negative_sampler == "popularity" and cfg.train.loss == "sampled" and not item_counts:
            raise ConfigError(
                "train.negative_sampler: popularity needs each item's count (items.jsonl of these shards "
                "has none: rebuild them with this version)"
            )

    def _dists(self, num_items: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(sampler probabilities or None for uniform, target popularity or None when unknown)."""
        if "pop" not in self._probs:
            pop = popularity(self.item_counts, num_items)
            self._probs["pop"] = None if pop is None else pop.to(device)
        pop = self._probs["pop"]
        return (pop if self.cfg.train.negative_sampler == "popularity" else None), pop

    def log_inclusion(
        self, num_items: int, positions: int, device: torch.device, items: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log P(item j is among a micro-batch's candidates) (float32 [num_items], or [len(items)] for the
        item indices ``items``): the candidates are ``positions`` in-batch positives, drawn by popularity
        (uniform when unknown), and ``train.num_negatives`` draws from the sampler, all with replacement, so
        ``P = 1 - (1 - p_j)^positions (1 - q_j)^num_negatives``. With it, ``sum over candidates of
        exp(logit - log P)`` is an unbiased (Horvitz-Thompson) estimate of the full softmax's partition
        function; for rare items it is ``log(positions p_j + num_negatives q_j)``, the usual logQ term.
        The loss asks for its candidates only: a step's cost must not grow with the catalogue."""
        sampler, pop = self._dists(num_items, device)
        n = num_items if items is None else items.numel()

        def probs(dist: torch.Tensor | None) -> torch.Tensor:
            if dist is None:
                return torch.full((n,), 1.0 / num_items, device=device, dtype=torch.float64)
            return (dist if items is None else dist[items]).double()

        p, q = probs(pop), probs(sampler)
        log_missed = positions * torch.log1p(
            -p.clamp(max=1 - 1e-12)
        ) + self.cfg.train.num_negatives * torch.log1p(-q.clamp(max=1 - 1e-12))
        return torch.log(-torch.expm1(log_missed)).float()

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, denominator: float | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to backward and its logs; every loss term (clean, adversarial, each FreeLB path
        point) is a sum over the supervised positions / ``denominator`` (module docstring), and so is
        each logged loss value (``loss``, ``clean_loss``, ``adv_loss``)."""
        cfg, rec = self.cfg, unwrap(model)
        mask = batch["attention_mask"]
        negatives = log_expected = None
        if cfg.task == "next_item" and cfg.train.loss in ("sampled", "gbce"):
            sampler, _ = self._dists(rec.num_items, mask.device)
            negatives = sample_negatives(rec.num_items, cfg.train.num_negatives, mask.device, sampler)
            if cfg.train.loss == "sampled" and cfg.train.logq_correction:
                log_expected = functools.partial(
                    self.log_inclusion, rec.num_items, supervised_positions(batch), mask.device
                )

        def loss_at(inputs_embeds: torch.Tensor, runner: nn.Module = model) -> torch.Tensor:
            hidden = runner(attention_mask=mask, inputs_embeds=inputs_embeds)
            return task_loss(rec, hidden, batch, cfg, negatives, denominator, log_expected)

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
