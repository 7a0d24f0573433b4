"""The reward for RL fine-tuning: differentiable scores of pixels, and the DDPO-style reward function."""

import numpy as np
import pytest
import torch
from PIL import Image

import sr_ray
from sr_ray.reward.score import RewardScorer


def smooth_pictures(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8 pictures with smooth content, like generations (not per-pixel noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (n, max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return np.stack([np.array(Image.fromarray(a).resize((w, h), Image.BICUBIC)) for a in small])


def as_pixels(arr: np.ndarray) -> torch.Tensor:
    return torch.tensor(arr).permute(0, 3, 1, 2).float() / 255.0


def test_score_pixels_is_differentiable_and_equals_score(checkpoint):
    scorer = RewardScorer(checkpoint, device="cpu")
    prompts = ["a red cat", "a blue house", "a red cat", "a tree"]
    native = smooth_pictures(4, 32, 32)  # sr-tiny's own size: no resize, so equal to float precision
    pix = as_pixels(native).requires_grad_(True)
    s = scorer.score_pixels(pix, prompts)
    assert s.shape == (4,) and s.requires_grad
    assert s.detach().numpy() == pytest.approx(scorer.score(prompts, [Image.fromarray(a) for a in native]), abs=1e-5)
    s.sum().backward()
    assert torch.isfinite(pix.grad).all() and pix.grad.abs().sum() > 0
    for h, w in ((64, 64), (80, 64), (150, 200)):  # resized: torch's antialiased bicubic vs PIL's
        arr = smooth_pictures(4, h, w, seed=h)
        diff = np.abs(scorer.score_pixels(as_pixels(arr), prompts).detach().numpy()
                      - scorer.score(prompts, [Image.fromarray(a) for a in arr])).max()
        assert diff < 2e-3, (h, w, diff)  # measured: <= 8e-4 on smooth pictures
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        scorer.score_pixels(torch.zeros(2, 32, 32), prompts[:2])


def test_reward_fn_in_the_ddpo_signature(checkpoint, tmp_path):
    fn = sr_ray.reward_fn(checkpoint, device="cpu", batch_size=3)
    arr = smooth_pictures(5, 32, 32, seed=3)
    prompts = ["a red cat"] * 3 + ["a boat", "a kite"]
    expected = RewardScorer(checkpoint, device="cpu").score(prompts, [Image.fromarray(a) for a in arr])
    # as TRL's DDPOTrainer.compute_rewards calls it: images from the pipeline (output_type="pt"), prompt metadata
    rewards, meta = fn(as_pixels(arr), tuple(prompts), [{}] * 5)
    rewards = torch.as_tensor(rewards)
    assert rewards.shape == (5,) and rewards.dtype == torch.float32 and not rewards.requires_grad
    assert rewards.numpy() == pytest.approx(expected, abs=1e-5) and meta["reward_model"] == checkpoint
    assert fn(arr, prompts, None)[0].numpy() == pytest.approx(expected, abs=1e-5)  # uint8 (B, H, W, 3)
    assert fn([Image.fromarray(a) for a in arr], prompts)[0].numpy() == pytest.approx(expected, abs=1e-5)
    from sr_ray.reward.export import ExportConfig, export

    export(ExportConfig(checkpoint=checkpoint, out=str(tmp_path / "e")))  # an exported folder works the same
    assert sr_ray.reward_fn(str(tmp_path / "e"), device="cpu")(as_pixels(arr), prompts)[0].numpy() == pytest.approx(
        expected, abs=1e-5)
