"""Sampled-softmax logQ correction and gBCE, on a stand-in model whose item scores are fixed numbers
(``task_loss`` only asks the model for item logits), so every value can be computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from configs import ConfigError, load_config
from modeling.loss import LossComputer, popularity, sample_negatives, task_loss


class Scores:
    """``item_logits(h, items)`` = ``h @ table[items].T``: a linear scorer with a fixed item table."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    @property
    def num_items(self) -> int:
        return self.table.shape[0]

    def item_logits(self, h: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        return h @ (self.table if items is None else self.table[items]).T


def _batch(labels: list[int]) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor([labels]), "attention_mask": torch.ones(1, len(labels), dtype=torch.long)}


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_inclusion_correction_makes_the_partition_estimate_unbiased():
    """Horvitz-Thompson: sum over the candidates of exp(s_j - log P(j is a candidate)) estimates the
    full softmax's partition sum(exp(s_j)) without bias, for popularity-sampled negatives and in-batch
    positives drawn by popularity; without the correction the estimate is far off."""
    torch.manual_seed(0)
    n_items, positions, k = 200, 8, 20
    counts = [int(1000 / (r + 1)) for r in range(n_items)]  # Zipf popularity
    cfg = _cfg("train.loss=sampled", "train.negative_sampler=popularity", f"train.num_negatives={k}")
    lc = LossComputer(cfg, counts)
    pop = popularity(counts, n_items)
    log_p = lc.log_inclusion(n_items, positions, torch.device("cpu"))
    scores = torch.randn(n_items, dtype=torch.float64)
    truth = scores.exp().sum()
    corrected, plain = [], []
    for _ in range(4000):
        y = torch.multinomial(pop, positions, replacement=True)
        cand = torch.cat([y, sample_negatives(n_items, k, torch.device("cpu"), pop)]).unique()
        corrected.append((scores[cand] - log_p[cand].double()).exp().sum())
        plain.append(scores[cand].exp().sum())
    assert float(torch.stack(corrected).mean() / truth) == pytest.approx(1.0, abs=0.03)
    assert float(torch.stack(plain).mean() / truth) < 0.5
    # Every item certain to be a candidate: no correction at all.
    everything = LossComputer(_cfg("train.loss=sampled", "train.num_negatives=100000"), counts)
    assert everything.log_inclusion(n_items, positions, torch.device("cpu")).abs().max() < 1e-6


def test_sampled_softmax_with_correction_over_every_item_is_the_full_softmax():
    torch.manual_seed(1)
    model = Scores(torch.randn(30, 4))
    hidden = torch.randn(1, 3, 4)
    batch = _batch([4, 7, 29])
    cfg = _cfg("train.loss=sampled", "train.num_negatives=100000")
    log_p = LossComputer(cfg, list(range(1, 31))).log_inclusion(30, 3, torch.device("cpu"))
    full = task_loss(model, hidden, batch, _cfg())
    sampled = task_loss(model, hidden, batch, cfg, negatives=torch.arange(30), log_expected=log_p)
    torch.testing.assert_close(full, sampled)
    # A small candidate set: each candidate's logit moves by -log P(candidate).
    neg = torch.tensor([0, 1, 2])
    log_p = LossComputer(_cfg("train.loss=sampled", "train.num_negatives=3")).log_inclusion(
        30, 3, torch.device("cpu")
    )
    got = task_loss(model, hidden, batch, cfg, negatives=neg, log_expected=log_p)
    cand = torch.tensor([0, 1, 2, 4, 7, 29])
    logits = hidden[0] @ model.table[cand].T - log_p[cand]
    want = F.cross_entropy(logits, torch.tensor([3, 4, 5]), reduction="mean")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("t", [0.0, 0.75, 1.0])
def test_gbce_is_the_papers_formula(t):
    torch.manual_seed(2)
    n_items, k = 50, 4
    model = Scores(torch.randn(n_items, 4))
    hidden = torch.randn(1, 2, 4)
    batch = _batch([3, 9])
    negatives = torch.tensor([9, 11, 20, 41])  # 9 is the second position's positive: left out there
    cfg = _cfg("train.loss=gbce", f"train.num_negatives={k}", f"train.gbce_t={t}")
    got = task_loss(model, hidden, batch, cfg, negatives=negatives)
    alpha = k / (n_items - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    s = hidden[0] @ model.table.T  # [2, N]
    want = 0.0
    for row, y in enumerate([3, 9]):
        want += -beta * math.log(torch.sigmoid(s[row, y]))
        want += sum(-math.log(torch.sigmoid(-s[row, j])) for j in negatives.tolist() if j != y)
    assert float(got) == pytest.approx(want / 2, rel=1e-5)
    assert (beta == 1.0) if t == 0.0 else True  # t=0: plain BCE


def test_popularity_sampler_draws_by_count_and_needs_counts():
    torch.manual_seed(3)
    pop = popularity([900, 90, 9, 1], 4)
    draws = sample_negatives(4, 20000, torch.device("cpu"), pop)
    freq = torch.bincount(draws, minlength=4).double() / 20000
    torch.testing.assert_close(freq, pop.double(), atol=0.01, rtol=0)
    with pytest.raises(ConfigError, match="train.negative_sampler"):
        LossComputer(_cfg("train.loss=sampled", "train.negative_sampler=popularity"), None)
    with pytest.raises(ConfigError, match="train.negative_sampler"):
        _cfg("train.loss=gbce", "train.negative_sampler=popularity")
    with pytest.raises(ConfigError, match="train.gbce_t"):
        _cfg("train.gbce_t=1.5")


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_log_inclusion_of_some_items_is_theirs_of_the_whole_vector(sampler):
    """Training asks for the candidates' log-inclusion only (its cost must not grow with the catalogue):
    the same numbers as the whole vector's entries."""
    lc = LossComputer(_cfg("train.loss=sampled", "train.num_negatives=7", f"train.negative_sampler={sampler}"),
                      list(range(1, 41)))  # fmt: skip
    items = torch.tensor([0, 5, 39, 17])
    whole = lc.log_inclusion(40, 9, torch.device("cpu"))
    assert torch.equal(lc.log_inclusion(40, 9, torch.device("cpu"), items=items), whole[items])
