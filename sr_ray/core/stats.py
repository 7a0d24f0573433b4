"""Numbers with confidence intervals for comparing reward models (paper Tables 3-6).

Pairs of one prompt are not independent (the same prompt, often the same images), so every interval here
is a *cluster* bootstrap: it resamples prompts with replacement and keeps all pairs of a drawn prompt.
Everything is vectorised numpy and seeded, so a table is the same on every run.

Tie policies of pairwise accuracy (score(pos) == score(neg)): ``half`` counts 1/2 (the default: unbiased
under a coin flip), ``correct`` counts 1 (the authors' code), ``skip`` leaves the pair out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TIE_POLICIES = ("half", "correct", "skip")


def pair_credit(pos: np.ndarray, neg: np.ndarray, ties: str = "half") -> tuple[np.ndarray, np.ndarray]:
    """(credit per pair in [0, 1], whether the pair counts) for score arrays of the same length.

    NaN scores (an image a scorer could not read) make the pair not count.
    """
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    tie = pos == neg
    credit = (pos > neg).astype(np.float64) + tie * (0.5 if ties == "half" else 1.0 if ties == "correct" else 0.0)
    counts = ~(np.isnan(pos) | np.isnan(neg))
    if ties == "skip":
        counts &= ~tie
    return credit, counts


def _clusters(groups) -> tuple[np.ndarray, int]:
    """Group labels (any hashable values) -> (dense int codes, number of groups)."""
    _, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    return codes, int(codes.max()) + 1 if len(codes) else 0


def _resampled_sums(values: np.ndarray, weights: np.ndarray, codes: np.ndarray, k: int, n_boot: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per bootstrap replicate, the sum of ``values`` and of ``weights`` over the drawn prompts."""
    per_v = np.bincount(codes, weights=values * weights, minlength=k)
    per_w = np.bincount(codes, weights=weights, minlength=k)
    # how often each prompt is drawn in each replicate: a multinomial over k equally likely prompts
    draws = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot) if k else np.zeros((n_boot, 0))
    return draws @ per_v, draws @ per_w


@dataclass
class Estimate:
    value: float
    ci_low: float
    ci_high: float
    n: int
    """Pairs (or items) that counted."""
    clusters: int
    """Prompts they came from."""

    def as_dict(self) -> dict:
        return {"accuracy": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "pairs": self.n,
                "prompts": self.clusters}


def bootstrap_mean(values, groups, weights=None, n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> Estimate:
    """Weighted mean of ``values`` with a percentile interval from a bootstrap over ``groups`` (prompts)."""
    values = np.asarray(values, np.float64)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, np.float64)
    keep = weights > 0  # a prompt none of whose pairs count is not a cluster to draw
    values, weights, groups = values[keep], weights[keep], np.asarray(groups, dtype=object)[keep]
    values = np.where(np.isnan(values), 0.0, values)
    codes, k = _clusters(groups)
    total = weights.sum()
    if total == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, k)
    point = float((values * weights).sum() / total)
    sv, sw = _resampled_sums(values, weights, codes, k, n_boot, np.random.default_rng(seed))
    reps = sv[sw > 0] / sw[sw > 0]
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]) if len(reps) else (np.nan, np.nan)
    return Estimate(point, float(lo), float(hi), int(weights.sum()), k)


def pairwise_accuracy(pos, neg, prompts, ties: str = "half", n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> Estimate:
    """Pairwise accuracy of one scorer on one test set, with a prompt-bootstrap interval."""
    credit, counts = pair_credit(pos, neg, ties)
    return bootstrap_mean(credit, prompts, counts.astype(np.float64), n_boot, level, seed)


def paired_difference(pos_a, neg_a, pos_b, neg_b, prompts, ties: str = "half", n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0) -> Estimate:
    """Accuracy of scorer A minus scorer B on the same pairs (only pairs both could score), with a paired
    prompt-bootstrap interval: both accuracies are recomputed on the same resampled prompts, so the interval
    of the difference is much narrower than the two intervals suggest. An interval above 0: A's lead is real."""
    ca, na = pair_credit(pos_a, neg_a, ties)
    cb, nb = pair_credit(pos_b, neg_b, ties)
    both = (na & nb).astype(np.float64)
    return bootstrap_mean(ca - cb, prompts, both, n_boot, level, seed)


def agreement(prefers: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """For every two scorers, the share of pairs on which they prefer the same image.

    ``prefers[name]``: +1 (positive preferred), -1 (negative preferred), 0 (tie), NaN (not scored); pairs one
    of the two did not score are left out of that cell.
    """
    names = list(prefers)
    out: dict[str, dict[str, float]] = {}
    for a in names:
        out[a] = {}
        for b in names:
            x, y = np.asarray(prefers[a], np.float64), np.asarray(prefers[b], np.float64)
            ok = ~(np.isnan(x) | np.isnan(y))
            out[a][b] = float((x[ok] == y[ok]).mean()) if ok.any() else float("nan")
    return out


def preference(pos, neg) -> np.ndarray:
    """+1 / -1 / 0 (tie) / NaN per pair, the input of :func:`agreement`."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    out = np.sign(pos - neg)
    out[np.isnan(pos) | np.isnan(neg)] = np.nan
    return out
