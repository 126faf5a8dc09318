"""Full-ranking and rating metrics: per-example outputs per rank, reduced exactly after gathering.

``eval_outputs`` ranks the target among ALL items (no sampled negatives; the history masked out when
``eval.exclude_seen``) and, with ``attack_epsilon > 0``, also under an FGM attack of that radius on
``inputs_embeds`` (keys prefixed ``adv_``). ``compute_metrics`` reduces concatenated outputs with
order-independent sums (integer counts per rank, sorted float sums), so outputs gathered from 2 ranks
give exactly the single-process numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from configs import RecGPTConfig
from modeling.adversarial import ascent_direction
from modeling.loss import unwrap

LIKE_THRESHOLD = 4.0  # "like" = rating >= 4 for the AUC
MISS_RANK = 2**31 - 1  # the rank of an example the model cannot score: beyond every K (a miss)


def target_ranks(scores: torch.Tensor, target: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """1-based rank of ``target`` in each row of ``scores`` [B, N]; ties count against the target
    (pessimistic). ``seen`` [B, S] (-1 padded): items masked out, the target itself never."""
    scores = scores.float()
    target_score = scores.gather(1, target[:, None])
    if seen is not None:
        # A spare column absorbs the -1 padding of ``seen``.
        padded = F.pad(scores, (0, 1))
        padded.scatter_(1, torch.where(seen >= 0, seen, scores.shape[1]), float("-inf"))
        scores = padded[:, :-1].scatter(1, target[:, None], target_score)
    return (scores >= target_score).sum(1)


def chunked_target_ranks(
    score_items,
    num_items: int,
    target: torch.Tensor,
    seen: torch.Tensor | None,
    max_k: int,
    chunk: int,
) -> torch.Tensor:
    """1-based rank of ``target`` [B] among all ``num_items`` items, scored ``chunk`` items at a time by
    ``score_items(lo, hi) -> [B, hi - lo]``: memory B x chunk, never B x num_items.

    Exact where the rank is <= ``max_k`` (equal to :func:`target_ranks` there: ties count against the
    target, ``seen`` [B, S] (-1 padded) masked out, the target never); any larger rank is returned as
    ``max_k + 1`` — HR/NDCG/MRR@K for K <= max_k are then exactly the full ranking's. A target outside
    ``0..num_items-1`` (an item the model does not know) gets ``max_k + 1``: a miss at every K.

    How: a running top-(max_k + 1) of every row's masked scores, merged chunk by chunk, and the target's
    score from its own chunk; the rank is the count of top values >= the target's score.
    """
    b = target.numel()
    keep = max_k + 1
    best = torch.full((b, keep), float("-inf"))
    t_score = torch.full((b,), float("nan"))
    rows = torch.arange(b)
    for lo in range(0, num_items, chunk):
        hi = min(lo + chunk, num_items)
        s = score_items(lo, hi).float()
        best = best.to(s.device)
        t_score = t_score.to(s.device)
        here = (target >= lo) & (target < hi)
        t_score[here] = s[rows[here], target[here] - lo]
        if seen is not None:
            hit = (seen >= lo) & (seen < hi) & (seen != target[:, None])
            r, c = hit.nonzero(as_tuple=True)
            s[r, seen[r, c] - lo] = float("-inf")
        top = s.topk(min(keep, hi - lo), dim=1).values
        best = torch.cat([best, top], 1).topk(keep, dim=1).values
    ranks = (best >= t_score[:, None]).sum(1)
    known = (target >= 0) & (target < num_items)
    return torch.where(known, ranks, torch.full_like(ranks, keep))


def _rows_at_labels(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The hidden state at each row's single supervised position [B, H]."""
    where = labels != -100
    if not bool((where.sum(1) == 1).all()):
        raise ValueError("eval batches need exactly one labelled position per row (built by an eval collate)")
    return hidden[where]


def _hidden(rec, batch, embeds) -> torch.Tensor:
    # The bare module, not a DeepSpeed engine: the engine's forward hooks its outputs to start a
    # training backward, which the attack's autograd.grad would trigger (ZeRO's weight-gathering
    # hooks sit on the submodules, so ZeRO-3 still works).
    hidden = rec(attention_mask=batch["attention_mask"], inputs_embeds=embeds)
    return _rows_at_labels(hidden, batch["labels"])


def _score(rec, batch, embeds, cfg: RecGPTConfig) -> torch.Tensor:
    h = _hidden(rec, batch, embeds)
    return rec.rating_output(h).float() if cfg.task == "rating" else rec.item_logits(h).float()


def _ranks(rec, h: torch.Tensor, batch, cfg: RecGPTConfig) -> torch.Tensor:
    """Full-ranking ranks of the batch's targets from the hidden rows ``h`` [B, H], in item chunks."""
    seen = batch["seen"] if cfg.eval.exclude_seen else None

    def score_items(lo: int, hi: int) -> torch.Tensor:
        return rec.item_logits(h, items=slice(lo, hi))

    return chunked_target_ranks(score_items, rec.num_items, batch["target"], seen, max(cfg.eval.ks),
                                cfg.eval.item_chunk)  # fmt: skip


def _loss_of_scores(scores: torch.Tensor, batch, rec, cfg: RecGPTConfig) -> torch.Tensor:
    y = batch["labels"][batch["labels"] != -100]
    if cfg.task == "rating" and rec.regression:
        return F.mse_loss(scores, batch["ratings"][batch["labels"] != -100].float(), reduction="sum")
    target = y if cfg.task == "rating" else batch["target"]
    return F.cross_entropy(scores, target, reduction="sum")


def _per_example(scores: torch.Tensor, batch, rec, cfg: RecGPTConfig, prefix: str) -> dict[str, torch.Tensor]:
    """Rating task: the per-example predictions from the rating scores."""
    levels = rec.rating_values.float()
    if rec.regression:
        pred = scores
        cls = (pred[:, None] - levels[None]).abs().argmin(1)
        like = pred
    else:
        probs = scores.softmax(-1)
        pred = probs @ levels
        cls = probs.argmax(-1)
        like = probs[:, levels >= LIKE_THRESHOLD].sum(-1)
    return {prefix + "pred_class": cls, prefix + "pred_rating": pred, prefix + "like_score": like}


def eval_outputs(
    model: nn.Module, batch: dict[str, torch.Tensor], cfg: RecGPTConfig, attack_epsilon: float = 0.0
) -> dict[str, torch.Tensor]:
    """Per-example CPU tensors for one eval batch, rows with ``valid=False`` dropped.

    next_item: ``rank`` [B] (1-based, full ranking in ``eval.item_chunk`` item chunks, exact up to
    max(``eval.ks``), larger ranks as max(ks) + 1: :func:`chunked_target_ranks`; with
    ``unknown_target`` / ``unknown_history`` in the batch — shards of another item vocabulary — those
    rows get :data:`MISS_RANK`, a miss, and the two flags are passed on). rating: ``pred_class``, ``pred_rating``,
    ``like_score``, and the truth ``label`` (level index) and ``rating``. With ``attack_epsilon > 0``
    the same per-example keys again under an FGM attack, prefixed ``adv_``.
    """
    rec = unwrap(model)
    mask = batch["attention_mask"]
    with torch.no_grad():
        embeds = rec.embed(batch["input_ids"])
        if cfg.task == "next_item":
            out = {"rank": _ranks(rec, _hidden(rec, batch, embeds), batch, cfg)}
        else:
            out = _per_example(_score(rec, batch, embeds, cfg), batch, rec, cfg, "")
    # Shards with another item vocabulary (modeling.collate.RemappedCollate): an example the model
    # cannot score — its target is an item it does not know, or its history holds none it knows — is
    # a miss (MISS_RANK, beyond every K even in a catalogue smaller than K): it stays in the
    # denominator of every metric.
    unscorable = None
    if "unknown_target" in batch:
        unscorable = batch["unknown_target"] | batch["unknown_history"]
        out["unknown_target"], out["unknown_history"] = batch["unknown_target"], batch["unknown_history"]
        out["rank"] = torch.where(unscorable, MISS_RANK, out["rank"])
    if attack_epsilon > 0:
        with torch.enable_grad():

            def loss_at(inputs_embeds: torch.Tensor) -> torch.Tensor:
                return _loss_of_scores(_score(rec, batch, inputs_embeds, cfg), batch, rec, cfg)

            delta = attack_epsilon * ascent_direction(loss_at, embeds, torch.zeros_like(embeds), mask)
        with torch.no_grad():
            if cfg.task == "next_item":
                out["adv_rank"] = _ranks(rec, _hidden(rec, batch, embeds + delta), batch, cfg)
            else:
                out.update(_per_example(_score(rec, batch, embeds + delta, cfg), batch, rec, cfg, "adv_"))
        if unscorable is not None:
            out["adv_rank"] = torch.where(unscorable, MISS_RANK, out["adv_rank"])
    if cfg.task == "rating":
        where = batch["labels"] != -100
        out["label"] = batch["labels"][where]
        out["rating"] = batch["ratings"][where]
    valid = batch["valid"]
    return {k: v[valid].detach().cpu() for k, v in out.items()}


def concat_outputs(outputs: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-batch (or per-rank) outputs key by key."""
    if not outputs:
        return {}
    return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}


def _sorted_mean(values: torch.Tensor) -> float:
    """Mean that does not depend on the order of the values (sorted float64 sum)."""
    return float(values.double().sort().values.sum() / max(values.numel(), 1))


def ranking_metrics(ranks: torch.Tensor, ks: Sequence[int], prefix: str = "") -> dict[str, float]:
    """``{prefix}hr@K``, ``{prefix}ndcg@K`` (1/log2(rank+1)) and ``{prefix}mrr@K`` for K in ``ks`` from
    1-based ``ranks`` [N] (e.g. :func:`target_ranks`): the means over the N examples, computed from
    exact integer counts per rank, so they do not depend on the order of the ranks."""
    n = ranks.numel()
    top = max(ks)
    counts = torch.bincount(ranks.clamp(max=top + 1).long(), minlength=top + 2).double()  # exact integers
    r = torch.arange(top + 2, dtype=torch.float64)
    out: dict[str, float] = {}
    for k in ks:
        hits = counts[1 : k + 1]
        out[f"{prefix}hr@{k}"] = float(hits.sum() / n)
        out[f"{prefix}ndcg@{k}"] = float((hits / torch.log2(r[1 : k + 1] + 1)).sum() / n)
        out[f"{prefix}mrr@{k}"] = float((hits / r[1 : k + 1]).sum() / n)
    return out


_ranking_metrics = ranking_metrics  # the earlier private name


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC (Mann-Whitney U, ties at average rank); NaN when one class is absent."""
    pos = int(positive.sum())
    neg = positive.numel() - pos
    if pos == 0 or neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each distinct value
    rank_sum = avg_rank[inverse][positive.bool()].sort().values.sum()
    return float((rank_sum - pos * (pos + 1) / 2) / (pos * neg))


def _rating_metrics(out: dict[str, torch.Tensor], prefix: str, name: str) -> dict[str, float]:
    rating, label = out["rating"].double(), out["label"]
    rmse = math.sqrt(_sorted_mean((out[prefix + "pred_rating"].double() - rating) ** 2))
    return {
        f"{name}accuracy": float((out[prefix + "pred_class"] == label).sum().item() / label.numel()),
        f"{name}rmse": rmse,
        f"{name}neg_rmse": -rmse,
        f"{name}auc": auc(out[prefix + "like_score"], rating >= LIKE_THRESHOLD),
    }


def compute_metrics(outputs: dict[str, torch.Tensor], cfg: RecGPTConfig) -> dict[str, float]:
    """Metrics of concatenated ``eval_outputs``: hr@K / ndcg@K (1/log2(rank+1)) / mrr@K for K in
    ``eval.ks`` (next_item), or accuracy / rmse / neg_rmse / auc (rating); ``robust_``-prefixed
    versions when the outputs carry an FGM attack. ``num_examples`` counts the examples.

    Scored on shards with another item vocabulary (``unknown_target`` in the outputs):
    ``unknown_targets`` counts the examples whose target the model does not know (an item new since it
    was trained) and ``unknown_target_fraction`` is their share; ``unknown_histories`` counts those
    with a known target but no known history item. Both kinds are misses *inside* the denominator:
    hr/ndcg/mrr are means over all ``num_examples``, so they are what the model achieves on the split
    as it is, unknown items included."""
    key = "rank" if cfg.task == "next_item" else "label"
    metrics: dict[str, float] = {"num_examples": float(outputs[key].numel()) if key in outputs else 0.0}
    if "unknown_target" in outputs:
        unknown = int(outputs["unknown_target"].sum())
        metrics["unknown_targets"] = float(unknown)
        metrics["unknown_target_fraction"] = unknown / max(1.0, metrics["num_examples"])
        metrics["unknown_histories"] = float(outputs["unknown_history"].sum())
    if not metrics["num_examples"]:
        return metrics
    for prefix, name in (("", ""), ("adv_", "robust_")):
        if cfg.task == "next_item" and prefix + "rank" in outputs:
            metrics.update(ranking_metrics(outputs[prefix + "rank"], cfg.eval.ks, name))
        if cfg.task == "rating" and prefix + "pred_class" in outputs:
            metrics.update(_rating_metrics(outputs, prefix, name))
    return metrics
