"""Each loss against a value worked out by hand on 2-D unit vectors."""

import math

import pytest
import torch

from sr_ray.reward.losses import LOSSES, LossConfig, compute_loss

# One triplet: t = e1, p at 60 degrees from t, n at 90 degrees: cos(t,p) = 0.5, cos(t,n) = 0.
T = torch.tensor([[1.0, 0.0]])
P = torch.tensor([[0.5, math.sqrt(3) / 2]])
N = torch.tensor([[0.0, 1.0]])


def test_triplet_by_hand():
    # ||t-p||^2 = 2 - 2*0.5 = 1 ; ||t-n||^2 = 2 ; max(0, 1 - 2 + 0.3) = 0 ; with margin 1.5: 0.5
    assert compute_loss(T, P, N, LossConfig("triplet", margin=0.3)).item() == pytest.approx(0.0)
    assert compute_loss(T, P, N, LossConfig("triplet", margin=1.5)).item() == pytest.approx(0.5)
    # swapped roles: 2 - 1 + 0.3 = 1.3
    assert compute_loss(T, N, P, LossConfig("triplet", margin=0.3)).item() == pytest.approx(1.3)


def test_infonce_by_hand():
    # candidates [p, n]; logits [0.5, 0] / tau ; loss = -log(e^(0.5/tau) / (e^(0.5/tau) + 1))
    tau = 0.5
    expected = -math.log(math.exp(1.0) / (math.exp(1.0) + 1.0))
    assert compute_loss(T, P, N, LossConfig("infonce", temperature=tau)).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_leaves_other_positives_of_the_same_prompt_out():
    # two triplets of one prompt, same t; p2 at 90 degrees from t (cos 0), n1 = n2 = n (cos 0), tau = 1.
    # Unmasked, t1's denominator holds p1, p2, n, n; masked, p2 is gone: -log(e^.5 / (e^.5 + 2)).
    p2 = torch.tensor([[0.0, 1.0]])
    t, p, n = torch.cat([T, T]), torch.cat([P, p2]), torch.cat([N, N])
    cfg = LossConfig("infonce", temperature=1.0)
    e = math.exp(0.5)
    l1 = -math.log(e / (e + 2))          # anchor 1: target p1, negatives n, n
    l2 = -math.log(1 / (1 + 2))          # anchor 2: target p2 (logit 0), negatives n, n
    assert compute_loss(t, p, n, cfg, torch.tensor([3, 3])).item() == pytest.approx((l1 + l2) / 2, rel=1e-6)
    # different prompts: p2 is a negative of t1 and p1 of t2
    u1, u2 = -math.log(e / (e + 1 + 2)), -math.log(1 / (e + 1 + 2))
    assert compute_loss(t, p, n, cfg, torch.tensor([3, 4])).item() == pytest.approx((u1 + u2) / 2, rel=1e-6)
    assert compute_loss(t, p, n, cfg).item() == pytest.approx((u1 + u2) / 2, rel=1e-6)


def test_triplet_margin_is_half_a_cosine_margin():
    # on unit vectors the hinge is 2 (s- - s+) + alpha: zero exactly when s+ - s- >= alpha / 2
    for gap, alpha in ((0.15, 0.3), (0.2, 0.3), (0.1, 0.3)):
        t = torch.tensor([[1.0, 0.0]])
        ang = lambda c: torch.tensor([[c, math.sqrt(1 - c * c)]])  # noqa: E731
        loss = compute_loss(t, ang(0.5 + gap), ang(0.5), LossConfig("triplet", margin=alpha)).item()
        assert loss == pytest.approx(max(0.0, 2 * (-gap) + alpha), abs=1e-6)


def test_supcon_by_hand():
    # anchors t and p over {t, p, n}: cos(t,p)=0.5, cos(t,n)=0, cos(p,n)=sqrt(3)/2
    tau = 1.0
    lt = -math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(0.0)))
    lp = -math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(math.sqrt(3) / 2)))
    got = compute_loss(T, P, N, LossConfig("supcon", temperature=tau)).item()
    assert got == pytest.approx((lt + lp) / 2, rel=1e-6)


def test_supcon_groups_same_prompt():
    # two triplets of one prompt: t1's positives are p1, t2 (same text) and p2
    t = torch.cat([T, T]); p = torch.cat([P, P]); n = torch.cat([N, N])
    same = compute_loss(t, p, n, LossConfig("supcon", temperature=1.0), torch.tensor([7, 7])).item()
    diff = compute_loss(t, p, n, LossConfig("supcon", temperature=1.0), torch.tensor([7, 8])).item()
    assert same != pytest.approx(diff)


def test_bce_by_hand():
    tau = 0.5  # logits: pos 1.0, neg 0.0
    expected = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2
    assert compute_loss(T, P, N, LossConfig("bce", temperature=tau)).item() == pytest.approx(expected, rel=1e-6)


def test_rce_by_hand():
    tau, beta = 0.5, 0.5
    s_pos, s_neg = 1 / (1 + math.exp(-1.0)), 0.5
    pos = s_pos ** beta * -math.log(s_pos)
    neg = (1 - s_neg) ** beta * -math.log(1 - s_neg)
    got = compute_loss(T, P, N, LossConfig("rce", temperature=tau, beta=beta)).item()
    assert got == pytest.approx((pos + neg) / 2, rel=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_prefers_the_right_order(name):
    good = compute_loss(T, P, N, LossConfig(name, margin=1.5)).item()
    bad = compute_loss(T, N, P, LossConfig(name, margin=1.5)).item()
    assert good < bad


def test_unknown_loss_rejected():
    with pytest.raises(ValueError, match="loss.name='hinge'"):
        LossConfig("hinge")
