"""sr-ray: Social Reward (Isajanyan et al., 2024) at scale on Ray.

``sr_ray.reward_fn(checkpoint)`` is the reward for diffusion RL trainers (see :func:`sr_ray.reward.score.reward_fn`);
it is imported on first use, so ``import sr_ray`` stays light.
"""


def __getattr__(name: str):
    if name == "reward_fn":
        from sr_ray.reward.score import reward_fn

        return reward_fn
    raise AttributeError(f"module 'sr_ray' has no attribute {name!r}")
