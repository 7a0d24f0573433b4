"""How far apart two datasets' cluster distributions are: KL divergence both ways, Jensen-Shannon, bootstrap
intervals and a label-shuffle null (paper Table 2).

All in nats (natural log). Every distribution is smoothed before it is compared: ``p_c = (n_c + a) / (n + a K)``
with ``a`` = ``smoothing`` (default 0.5, the Jeffreys/Krichevsky-Trofimov pseudo-count) for each of the K
clusters, so a cluster one dataset never visits gives a finite KL instead of infinity.

The plug-in KL of two samples is biased upwards: two samples of the *same* source are never exactly alike, and
with K clusters and n prompts each their KL is about (K - 1) / n on average. So each value comes with

- a bootstrap interval: the prompts of each dataset are resampled with replacement (the clusters held fixed,
  as the paper clusters once) and the *basic* interval ``[2 KL - q_hi, 2 KL - q_lo]`` is reported, clipped at 0:
  it moves the interval down by the bootstrap's estimate of the bias, so two samples of one source get an
  interval that reaches 0, which the plain percentile interval never does;
- a null: the two datasets' cluster labels pooled and dealt out again at random (same sizes), 95th percentile
  of the KL that gives, and the share of shuffles at least as large as the observed KL (``p_value``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_SMOOTHING = 0.5


def counts_of(labels: np.ndarray, k: int) -> np.ndarray:
    """Prompts per cluster (clusters 0..k-1)."""
    return np.bincount(np.asarray(labels, np.int64), minlength=k)


def smoothed(counts: np.ndarray, smoothing: float = DEFAULT_SMOOTHING) -> np.ndarray:
    """``(n_c + a) / (n + a K)`` along the last axis."""
    c = np.asarray(counts, np.float64) + smoothing
    return c / c.sum(axis=-1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats along the last axis; p, q: distributions with q > 0 wherever p > 0."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(axis=-1)


def js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in nats (symmetric, at most ln 2)."""
    m = (np.asarray(p, np.float64) + np.asarray(q, np.float64)) / 2
    return (kl(p, m) + kl(q, m)) / 2


@dataclass
class Divergence:
    kl: float
    ci_low: float
    ci_high: float
    js: float
    js_ci_low: float
    js_ci_high: float
    null_p95: float
    """95th percentile of the KL after shuffling the two datasets' labels: what chance alone gives."""
    p_value: float
    n_p: int
    n_q: int

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _basic(point: float, reps: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return max(0.0, 2 * point - hi), max(0.0, 2 * point - lo)


def compare(counts_p: np.ndarray, counts_q: np.ndarray, smoothing: float = DEFAULT_SMOOTHING, n_boot: int = 1000,
            level: float = 0.95, seed: int = 0) -> Divergence:
    """KL(P || Q), JS(P, Q), their intervals and the shuffle null, from the two datasets' cluster counts."""
    cp, cq = np.asarray(counts_p, np.int64), np.asarray(counts_q, np.int64)
    n_p, n_q = int(cp.sum()), int(cq.sum())
    if n_p == 0 or n_q == 0:
        raise ValueError("compare: a dataset with no prompt")
    p, q = smoothed(cp, smoothing), smoothed(cq, smoothing)
    point_kl, point_js = float(kl(p, q)), float(js(p, q))
    rng = np.random.default_rng(seed)
    bp = smoothed(rng.multinomial(n_p, cp / n_p, size=n_boot), smoothing)  # resampling prompts = multinomial
    bq = smoothed(rng.multinomial(n_q, cq / n_q, size=n_boot), smoothing)
    kl_lo, kl_hi = _basic(point_kl, kl(bp, bq), level)
    js_lo, js_hi = _basic(point_js, js(bp, bq), level)
    shuffled = rng.multivariate_hypergeometric(cp + cq, n_p, size=n_boot)  # P's share of the pooled labels
    null = kl(smoothed(shuffled, smoothing), smoothed(cp + cq - shuffled, smoothing))
    return Divergence(point_kl, kl_lo, kl_hi, point_js, js_lo, js_hi, float(np.quantile(null, 0.95)),
                      float((1 + (null >= point_kl).sum()) / (1 + n_boot)), n_p, n_q)


def divergence_matrix(labels: dict[str, np.ndarray], k: int, smoothing: float = DEFAULT_SMOOTHING,
                      n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, dict[str, Divergence]]:
    """{P: {Q: Divergence}} for every ordered pair of datasets (``labels``: each dataset's cluster per prompt)."""
    counts = {name: counts_of(v, k) for name, v in labels.items()}
    names = list(labels)
    return {a: {b: compare(counts[a], counts[b], smoothing, n_boot, level, seed + 7919 * i + j)
                for j, b in enumerate(names) if b != a} for i, a in enumerate(names)}
