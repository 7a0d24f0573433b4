"""The losses of the paper's Table 7, as pure functions over normalised embeddings.

Every loss takes ``t`` (prompt), ``p`` (popular image), ``n`` (unpopular image),
each (B, D) and L2-normalised, plus a :class:`LossConfig`, and returns a scalar.
``prompt_ids`` (B,) int64, when given, tells which triplets share a prompt
(used by supervised contrastive to treat them as one class).

B is the *global* batch: in data-parallel training :func:`global_batch_loss` gathers every worker's rows
first (its own keep their gradient), so a loss's value and its gradient do not depend on how the batch is
split over workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    name: str = "triplet"
    """One of: triplet, infonce, supcon, bce, rce."""
    margin: float = 0.3
    """Triplet margin alpha (the authors' code: 0.3)."""
    temperature: float = 0.07
    """Softmax / logit temperature tau for infonce, supcon, bce, rce (logit = cos / tau)."""
    beta: float = 0.25
    """Reweighting exponent of rce (Wang et al. 2021)."""

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"loss.name={self.name!r} is not one of {sorted(LOSSES)}")
        if self.temperature <= 0:
            raise ValueError("loss.temperature must be > 0")


def triplet(t, p, n, cfg: LossConfig, prompt_ids=None) -> torch.Tensor:
    """Triplet loss (the paper's choice): mean_i max(0, ||t_i - p_i||^2 - ||t_i - n_i||^2 + alpha).

    On unit vectors ||a - b||^2 = 2 - 2 a.b, so the hinge is max(0, 2 (s-_i - s+_i) + alpha) with
    s+_i = t_i.p_i, s-_i = t_i.n_i: alpha = 0.3 asks for a cosine margin of alpha / 2 = 0.15.
    """
    d_pos = (t - p).pow(2).sum(-1)
    d_neg = (t - n).pow(2).sum(-1)
    return F.relu(d_pos - d_neg + cfg.margin).mean()


def infonce(t, p, n, cfg: LossConfig, prompt_ids=None) -> torch.Tensor:
    """InfoNCE: each prompt picks its popular image among the 2B images of the batch, other popular images of
    its own prompt left out (they are not negatives).

    logits_ij = t_i . c_j / tau over candidates c = [p_1..p_B, n_1..n_B];
    loss = mean_i -log( exp(logits_ii) / sum_{j in C(i)} exp(logits_ij) ),
    C(i) = every candidate but the p_j (j != i) whose prompt_ids[j] == prompt_ids[i]. Without ``prompt_ids``
    every triplet is its own prompt.
    """
    b = t.shape[0]
    cands = torch.cat([p, n], dim=0)
    logits = t @ cands.T / cfg.temperature
    if prompt_ids is not None:
        same = prompt_ids[:, None] == prompt_ids[None, :]
        same &= ~torch.eye(b, dtype=torch.bool, device=t.device)  # keep each prompt's own target
        mask = torch.cat([same, torch.zeros_like(same)], dim=1)  # unpopular images stay negatives
        logits = logits.masked_fill(mask, float("-inf"))
    target = torch.arange(b, device=t.device)
    return F.cross_entropy(logits, target)


def supcon(t, p, n, cfg: LossConfig, prompt_ids=None) -> torch.Tensor:
    """Supervised contrastive (Khosla et al. 2020) with the prompt as the class.

    The batch holds 3B embeddings {t_i, p_i, n_i}. Texts and popular images of
    the same prompt share a class; each unpopular image is a class of its own.
    Anchors a are the t_i and p_i; P(a) = other members of a's class; A(a) = all
    embeddings but a:
        loss = mean_a  -1/|P(a)| sum_{q in P(a)} log( exp(a.q/tau) / sum_{k in A(a)} exp(a.k/tau) ).
    """
    b = t.shape[0]
    if prompt_ids is None:
        prompt_ids = torch.arange(b, device=t.device)
    z = torch.cat([t, p, n], dim=0)
    neg_labels = -1 - torch.arange(b, device=t.device)  # unique, never equal to a prompt id >= 0
    labels = torch.cat([prompt_ids, prompt_ids, neg_labels.to(prompt_ids.dtype)])
    sim = z[: 2 * b] @ z.T / cfg.temperature  # anchors: t and p
    self_mask = torch.zeros_like(sim, dtype=torch.bool)
    self_mask[torch.arange(2 * b), torch.arange(2 * b)] = True
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos_mask = (labels[: 2 * b, None] == labels[None, :]) & ~self_mask
    mean_log_pos = (log_prob.masked_fill(~pos_mask, 0.0)).sum(1) / pos_mask.sum(1)
    return -mean_log_pos.mean()


def _pointwise(t, p, n, cfg: LossConfig):
    logits = torch.cat([(t * p).sum(-1), (t * n).sum(-1)]) / cfg.temperature
    labels = torch.cat([torch.ones(t.shape[0]), torch.zeros(t.shape[0])]).to(logits)
    return logits, labels


def bce(t, p, n, cfg: LossConfig, prompt_ids=None) -> torch.Tensor:
    """Binary cross-entropy on (prompt, image) pairs: popular = 1, unpopular = 0.

    loss = mean over the 2B pairs of -[y log s(x) + (1 - y) log(1 - s(x))], x = cos(t, image) / tau.
    """
    logits, labels = _pointwise(t, p, n, cfg)
    return F.binary_cross_entropy_with_logits(logits, labels)


def rce(t, p, n, cfg: LossConfig, prompt_ids=None) -> torch.Tensor:
    """Reweighted cross-entropy (R-CE, Wang et al. 2021, "Denoising implicit feedback").

    The BCE of each pair is weighted by its own (detached) prediction, so hard
    pairs, the likely noisy labels of implicit feedback, count less:
        w = s(x)^beta for popular pairs, (1 - s(x))^beta for unpopular ones,
        loss = mean over the 2B pairs of w * BCE(x, y),  x = cos(t, image) / tau.
    """
    logits, labels = _pointwise(t, p, n, cfg)
    per_pair = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    prob = torch.sigmoid(logits).detach()
    weight = prob.pow(cfg.beta) * labels + (1 - prob).pow(cfg.beta) * (1 - labels)
    return (weight * per_pair).mean()


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "triplet": triplet,
    "infonce": infonce,
    "supcon": supcon,
    "bce": bce,
    "rce": rce,
}


def compute_loss(t, p, n, cfg: LossConfig, prompt_ids=None) -> torch.Tensor:
    return LOSSES[cfg.name](t, p, n, cfg, prompt_ids)


def gather_rows(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """Every worker's rows of each tensor, concatenated in rank order, and the world size.

    Other workers' rows arrive without gradient; this worker's own rows are the tensors passed in, so its
    part of the graph is kept (open_clip's ``gather_features`` without ``gather_with_grad``). Every worker
    must pass tensors of the same shape (training batches are fixed-size: ``drop_last``). With no process
    group, or one worker, the tensors come back as they are.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors), 1
    world, rank = dist.get_world_size(), dist.get_rank()
    out = []
    for x in tensors:
        sent = x.detach().to(torch.uint8) if x.dtype == torch.bool else x.detach()
        parts = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(parts, sent.contiguous())
        parts = [q.to(torch.bool) for q in parts] if x.dtype == torch.bool else parts
        parts[rank] = x
        out.append(torch.cat(parts))
    return out, world


def global_batch_loss(t, p, n, prompt_ids, valid, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, the loss's value) over the global batch: the rows of every worker with
    ``valid`` True.

    Every worker computes the same global loss L, but its gradient flows only through its own rows; DDP then
    averages the W workers' gradients, so the loss to backpropagate is W * L: the sum over workers of
    the gradient through each one's rows is exactly dL/dθ, the gradient one worker with the whole batch gets.
    """
    (t, p, n, prompt_ids, valid), world = gather_rows(t, p, n, prompt_ids, valid)
    if valid.any():
        loss = compute_loss(t[valid], p[valid], n[valid], cfg, prompt_ids[valid])
    else:  # keep every parameter in the graph so DDP's all-reduce still lines up
        loss = (t.sum() + p.sum() + n.sum()) * 0.0
    return loss * world, loss.detach()
