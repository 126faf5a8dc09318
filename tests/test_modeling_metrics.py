"""Ranking/rating metrics against brute force, exact 2-rank reduction, perturbation geometry."""

from __future__ import annotations

import math

import pytest
import torch

from configs import AdversarialConfig, load_config
from modeling.adversarial import example_norms, perturbed_loss
from modeling.metrics import auc, chunked_target_ranks, compute_metrics, concat_outputs, target_ranks


def _brute_rank(scores: list[float], target: int, seen: list[int]) -> int:
    masked = {i for i in seen if i >= 0 and i != target}
    t = scores[target]
    return 1 + sum(1 for i, s in enumerate(scores) if i != target and i not in masked and s >= t)


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_ranking_metrics_match_brute_force(exclude_seen):
    g = torch.Generator().manual_seed(0)
    B, N = 200, 50
    scores = torch.randint(0, 8, (B, N), generator=g).float()  # many ties: pessimistic ranks matter
    target = torch.randint(0, N, (B,), generator=g)
    seen = torch.randint(-1, N, (B, 6), generator=g)
    seen[:5, 0] = target[:5]  # a seen target is never masked
    ranks = target_ranks(scores, target, seen if exclude_seen else None)
    ks = [1, 5, 10]
    cfg = load_config(None, ["eval.ks=[1,5,10]", f"eval.exclude_seen={exclude_seen}"])
    metrics = compute_metrics({"rank": ranks}, cfg)
    brute = [
        _brute_rank(scores[b].tolist(), int(target[b]), seen[b].tolist() if exclude_seen else [])
        for b in range(B)
    ]
    assert ranks.tolist() == brute
    for k in ks:
        assert metrics[f"hr@{k}"] == pytest.approx(sum(r <= k for r in brute) / B, abs=1e-12)
        assert metrics[f"ndcg@{k}"] == pytest.approx(
            sum(1 / math.log2(r + 1) for r in brute if r <= k) / B, abs=1e-12
        )
        assert metrics[f"mrr@{k}"] == pytest.approx(sum(1 / r for r in brute if r <= k) / B, abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 50, 1000])
@pytest.mark.parametrize("exclude_seen", [True, False])
def test_chunked_ranks_equal_the_full_ranking_up_to_max_k(chunk, exclude_seen):
    """Item chunks of any size give the full ranking's ranks where they are <= max_k (ties and masking
    included) and max_k + 1 beyond, so every metric @K <= max_k is identical; an unknown target misses."""
    g = torch.Generator().manual_seed(3)
    B, N, max_k = 300, 50, 10
    scores = torch.randint(0, 8, (B, N), generator=g).float()  # many ties
    target = torch.randint(0, N, (B,), generator=g)
    seen = torch.randint(-1, N, (B, 6), generator=g)
    seen[:5, 0] = target[:5]
    seen = seen if exclude_seen else None
    full = target_ranks(scores, target, seen)
    got = chunked_target_ranks(lambda lo, hi: scores[:, lo:hi].clone(), N, target, seen, max_k, chunk)
    assert got.tolist() == full.clamp(max=max_k + 1).tolist()
    assert (full > max_k).any() and (full <= 3).any()
    cfg = load_config(None, ["eval.ks=[1,5,10]"])
    assert compute_metrics({"rank": got}, cfg) == compute_metrics({"rank": full}, cfg)
    unknown = target.clone()
    unknown[:4] = N  # an item the model does not know
    assert (
        chunked_target_ranks(lambda lo, hi: scores[:, lo:hi].clone(), N, unknown, seen, max_k, chunk)[
            :4
        ].tolist()
        == [max_k + 1] * 4
    )


def test_two_rank_reduction_equals_single_process():
    g = torch.Generator().manual_seed(1)
    n = 101
    out = {"rank": torch.randint(1, 40, (n,), generator=g)}
    cfg = load_config(None, [])
    single = compute_metrics(out, cfg)
    # Rank r of 2 gets every second example (as a distributed sampler would); the trainer concatenates.
    gathered = concat_outputs([{k: v[r::2] for k, v in out.items()} for r in range(2)])
    assert compute_metrics(gathered, cfg) == single

    rcfg = load_config(None, ["task=rating", "eval.metric=accuracy"])
    rating = torch.randint(1, 11, (n,), generator=g).float() / 2
    rout = {
        "label": (rating * 2 - 1).long(),
        "rating": rating,
        "pred_class": torch.randint(0, 10, (n,), generator=g),
        "pred_rating": torch.rand(n, generator=g) * 5,
        "like_score": torch.rand(n, generator=g),
    }
    single = compute_metrics(rout, rcfg)
    gathered = concat_outputs([{k: v[r::2] for k, v in rout.items()} for r in range(2)])
    assert compute_metrics(gathered, rcfg) == single
    assert single["rmse"] == pytest.approx(
        float(((rout["pred_rating"] - rating) ** 2).mean().sqrt()), rel=1e-6
    )
    assert single["accuracy"] == pytest.approx(float((rout["pred_class"] == rout["label"]).float().mean()))


def test_auc_matches_pairwise_count():
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 5, (60,), generator=g).float()
    pos = torch.rand(60, generator=g) > 0.4
    pairs = [
        (float(scores[i] > scores[j]) + 0.5 * float(scores[i] == scores[j]))
        for i in range(60)
        if pos[i]
        for j in range(60)
        if not pos[j]
    ]
    assert auc(scores, pos) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert math.isnan(auc(scores, torch.ones(60, dtype=torch.bool)))


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb"])
def test_perturbation_stays_in_ball_and_is_zero_on_padding(method):
    torch.manual_seed(0)
    B, T, H = 4, 7, 16
    embeds = torch.randn(B, T, H, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    weight = torch.randn(H, 3)
    seen_deltas = []

    def loss_at(x):
        seen_deltas.append((x - embeds).detach())
        # Padding positions DO influence this toy loss, so only the explicit masking keeps them at zero.
        return ((x @ weight).tanh() ** 2).sum() / B

    acfg = AdversarialConfig(method=method, epsilon=0.5, alpha=0.4, steps=4, init_magnitude=0.5)
    loss, logs = perturbed_loss(loss_at, loss_at, embeds, mask, acfg)
    loss.backward()
    assert set(logs) == {"loss", "clean_loss", "adv_loss", "perturbation_norm"}
    # Forwards: each ascent step has its own (ZeRO-3 backpropagates a graph only once), plus the
    # losses that reach the parameters: fgm 1 + clean + adv; pgd 4 + 2; freelb 4 losses + 3 ascents.
    assert len(seen_deltas) == {"fgm": 3, "pgd": 6, "freelb": 7}[method]
    for delta in seen_deltas:
        assert torch.all(delta[mask == 0] == 0)
        assert torch.all(example_norms(delta, mask) <= acfg.epsilon * (1 + 1e-5))
    last = example_norms(seen_deltas[-1], mask)
    if method == "fgm":
        assert torch.allclose(last, torch.full((B,), acfg.epsilon))
    assert logs["perturbation_norm"] == pytest.approx(float(last.mean()), rel=1e-5)
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
