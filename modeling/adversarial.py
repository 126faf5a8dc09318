"""Adversarial perturbation of ``inputs_embeds`` (FGM, PGD, FreeLB) returning ONE loss to backward.

The embedding *weights* are never edited (ZeRO-3 partitions them; DeepSpeed#5667): a perturbation
``delta`` [B, T, H] is added to the embeddings of the batch. Norms are per example over its real
tokens (padding masked to zero), so every example's perturbation lies in its own L2 ball of radius
epsilon. Ascent directions come from ``torch.autograd.grad`` w.r.t. ``delta`` only (no parameter
``.grad`` is touched), and the returned loss goes through a single ``engine.backward`` — correct under
gradient accumulation, every ZeRO stage, LoRA, and non-reentrant activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from configs import AdversarialConfig

_TINY = 1e-12


def _mask(attention_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return attention_mask.unsqueeze(-1).to(like.dtype)


def example_norms(delta: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm [B] over the real tokens."""
    return (delta.float() * _mask(attention_mask, delta.float())).pow(2).sum(dim=(1, 2)).sqrt()


def normalize(g: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """g / ||g|| per example, zero on padding (zero where the gradient vanishes)."""
    g = g * _mask(attention_mask, g)
    return g / (example_norms(g, attention_mask).clamp_min(_TINY).view(-1, 1, 1).to(g.dtype))


def project(delta: torch.Tensor, attention_mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Scale each example's perturbation back into the L2 ball of radius epsilon; zero on padding."""
    delta = delta * _mask(attention_mask, delta)
    scale = (epsilon / example_norms(delta, attention_mask).clamp_min(_TINY)).clamp(max=1.0)
    return delta * scale.view(-1, 1, 1).to(delta.dtype)


def random_init(embeds: torch.Tensor, attention_mask: torch.Tensor, radius: float) -> torch.Tensor:
    """FreeLB's start: uniform noise rescaled to per-example norm ``radius`` on the real tokens."""
    noise = torch.empty_like(embeds).uniform_(-1, 1)
    return normalize(noise, attention_mask) * radius


def ascent_direction(
    loss_at: Callable[[torch.Tensor], torch.Tensor],
    embeds: torch.Tensor,
    delta: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Normalized gradient of the loss at ``embeds + delta`` w.r.t. ``delta`` only.

    A forward of its own, on detached embeddings, whose graph is freed by ``autograd.grad``: ZeRO-3
    gathers a module's partitioned weights for backward once per forward call, so a graph that is
    backpropagated twice (``retain_graph`` here, then ``engine.backward``) sees empty weights.
    """
    d = delta.detach().requires_grad_()
    (g,) = torch.autograd.grad(loss_at(embeds.detach() + d), d)
    return normalize(g.detach(), attention_mask)


def perturbed_loss(
    loss_at: Callable[[torch.Tensor], torch.Tensor],
    probe_loss_at: Callable[[torch.Tensor], torch.Tensor],
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    acfg: AdversarialConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss under ``acfg.method`` and its logs.

    ``loss_at(inputs_embeds) -> scalar`` runs the model and the task loss; ``probe_loss_at`` is the
    same loss for the ascent steps, whose gradient reaches only the perturbation. fgm / pgd: clean loss +
    adv_weight x loss at the (detached) adversarial perturbation. freelb: mean of the losses along the
    ascent path from a random start (its ``clean_loss`` is the first of them, at the random start);
    FreeLB keeps all ``steps`` graphs until the backward — memory grows with ``steps``. Every graph that
    reaches the parameters is backpropagated exactly once, by the caller's single backward.

    Weighting: ``loss_at`` returns a sum over the supervised positions divided by the optimizer step's
    denominator (``modeling.loss``); every combination here is linear in it (clean + adv_weight x adv,
    the path mean), so the adversarial terms weigh each supervised position of the step equally too.
    The ascent directions are normalised per example, so that scale does not change the perturbation.
    """
    eps, method = acfg.epsilon, acfg.method
    if method == "freelb":
        delta = random_init(embeds.detach(), attention_mask, acfg.init_magnitude * eps)
        losses = []
        for k in range(acfg.steps):
            losses.append(loss_at(embeds + delta.detach()))
            if k < acfg.steps - 1:
                step = acfg.alpha * ascent_direction(probe_loss_at, embeds, delta, attention_mask)
                delta = project(delta + step, attention_mask, eps)
        total = torch.stack(losses).mean()
        # The final perturbation is the one the last loss saw.
        return total, _logs(total, losses[0], total, delta, attention_mask)

    # fgm: one step of length epsilon; pgd: steps of size alpha, each projected onto the eps ball.
    delta = torch.zeros_like(embeds)
    if method == "fgm":
        delta = eps * ascent_direction(probe_loss_at, embeds, delta, attention_mask)
    else:
        for _ in range(acfg.steps):
            step = acfg.alpha * ascent_direction(probe_loss_at, embeds, delta, attention_mask)
            delta = project(delta + step, attention_mask, eps)
    clean = loss_at(embeds)
    adv = loss_at(embeds + delta.detach())
    total = clean + acfg.adv_weight * adv
    return total, _logs(total, clean, adv, delta, attention_mask)


def _grad(loss: torch.Tensor, wrt: torch.Tensor, retain_graph: bool) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, wrt, retain_graph=retain_graph)
    return g.detach()


def _logs(total, clean, adv, delta, attention_mask) -> dict[str, float]:
    return {
        "loss": float(total.detach()),
        "clean_loss": float(clean.detach()),
        "adv_loss": float(adv.detach()),
        "perturbation_norm": float(example_norms(delta.detach(), attention_mask).mean()),
    }
