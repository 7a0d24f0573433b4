"""Pairwise accuracy with tie policies and prompt-bootstrap intervals, worked out by hand."""

import numpy as np
import pytest

from sr_ray.core.stats import agreement, pair_credit, paired_difference, pairwise_accuracy, preference


def test_tie_policies_and_unscored_pairs():
    pos = [1.0, 0.5, 0.2, np.nan, 0.9]
    neg = [0.0, 0.5, 0.3, 1.0, 0.1]
    prompts = ["a", "a", "b", "b", "c"]
    # scored pairs: 1 (right), tie, wrong, right -> half: 2.5/4, correct: 3/4, skip: 2/3
    assert pairwise_accuracy(pos, neg, prompts, "half").value == pytest.approx(2.5 / 4)
    assert pairwise_accuracy(pos, neg, prompts, "correct").value == pytest.approx(3 / 4)
    est = pairwise_accuracy(pos, neg, prompts, "skip")
    assert est.value == pytest.approx(2 / 3) and est.n == 3 and est.clusters == 3
    credit, counts = pair_credit(pos, neg, "half")
    assert credit[:3].tolist() == [1.0, 0.5, 0.0] and counts.tolist() == [True, True, True, False, True]
    with pytest.raises(ValueError, match="ties must be one of"):
        pair_credit(pos, neg, "coin")


def test_interval_is_a_prompt_bootstrap_not_a_pair_bootstrap():
    """10 prompts of 50 pairs each, every pair of a prompt with the same outcome: the evidence is 10 prompts,
    so the interval must be about as wide as for 10 independent pairs, far wider than for 500."""
    rng = np.random.default_rng(0)
    right = rng.random(10) < 0.6
    pos = np.repeat(np.where(right, 1.0, 0.0), 50)
    neg = np.full(500, 0.5)
    clustered = pairwise_accuracy(pos, neg, np.repeat(np.arange(10), 50), seed=1)
    naive = pairwise_accuracy(pos, neg, np.arange(500), seed=1)
    assert clustered.value == naive.value == right.mean()
    assert clustered.ci_low <= clustered.value <= clustered.ci_high
    assert (clustered.ci_high - clustered.ci_low) > 3 * (naive.ci_high - naive.ci_low)
    # a scorer right on every pair has nothing to resample: [1, 1]
    perfect = pairwise_accuracy(np.ones(20), np.zeros(20), np.arange(20) // 4)
    assert (perfect.value, perfect.ci_low, perfect.ci_high) == (1.0, 1.0, 1.0)
    # seeded: the same table on every run
    again = pairwise_accuracy(pos, neg, np.repeat(np.arange(10), 50), seed=1)
    assert (again.ci_low, again.ci_high) == (clustered.ci_low, clustered.ci_high)


def test_paired_difference_sees_a_real_lead():
    rng = np.random.default_rng(2)
    prompts = np.arange(400) // 4
    neg = np.zeros(400)
    a = np.ones(400)                                   # A: right on every pair
    b = np.where(rng.random(400) < 0.5, 1.0, -1.0)     # B: a coin
    d = paired_difference(a, neg, b, neg, prompts)
    assert d.value == pytest.approx(1.0 - (b > 0).mean())
    assert d.ci_low > 0.35
    same = paired_difference(a, neg, a, neg, prompts)
    assert (same.value, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)


def test_agreement_matrix_by_hand():
    prefers = {"x": preference([1, 1, 0, 0], [0, 0, 1, 1]),        # + + - -
               "y": preference([1, 0, 0, np.nan], [0, 1, 1, 0]),   # + - - .
               "z": preference([1, 1, 1, 1], [1, 0, 0, 0])}        # 0 + + +
    m = agreement(prefers)
    assert m["x"]["x"] == 1.0
    assert m["x"]["y"] == m["y"]["x"] == pytest.approx(2 / 3)       # first 3 pairs: + - - vs + + -
    assert m["x"]["z"] == pytest.approx(1 / 4)                      # only pair 2 agrees
    assert m["y"]["z"] == pytest.approx(0.0)
