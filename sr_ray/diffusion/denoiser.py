"""The trained part of Stable Diffusion and its loss, shared by fine-tuning (:mod:`sr_ray.diffusion.finetune`)
and the tiny generator's pre-training (:mod:`sr_ray.diffusion.tiny`)."""

from __future__ import annotations

import torch


class Denoiser(torch.nn.Module):
    """The trained part: text encoder -> U-Net noise prediction. One module, so DDP/DeepSpeed wrap both."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) noisy latents, (B,) timesteps, (B, L) token ids -> (B, C, h, w) prediction."""
        hidden = self.text_encoder(input_ids)[0]
        return self.unet(noisy, timesteps, hidden).sample


def diffusion_loss(denoiser, vae, scheduler, batch: dict[str, torch.Tensor], generator=None,
                   timestep_power: float = 1.0) -> torch.Tensor:
    """Noise-prediction MSE over the valid rows (epsilon or v target, from the scheduler's prediction_type).

    Timesteps are uniform, as SD is trained; ``timestep_power`` p > 1 draws t = T * u ** (1 / p) instead
    (density rising as t ** (p - 1)): more of the noisy steps, where a picture's layout and colours are decided.

    ``batch``: ``input_ids`` (B, L), ``valid`` (B,), and ``pixel_values`` (B, 3, R, R) in [-1, 1] or cached
    ``latent_moments`` (B, 2C, h, w). Rows with valid=False weigh 0 (all ranks still step together).
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    valid = batch["valid"].float()
    if "latent_moments" in batch:
        dist = DiagonalGaussianDistribution(batch["latent_moments"])
    else:
        with torch.no_grad():
            dist = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist
    latents = dist.sample(generator).float() * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    steps = scheduler.config.num_train_timesteps
    if timestep_power == 1.0:
        t = torch.randint(0, steps, (latents.shape[0],), device=latents.device, generator=generator)
    else:
        u = torch.rand(latents.shape[0], device=latents.device, generator=generator)
        t = (steps * u ** (1.0 / timestep_power)).long().clamp(0, steps - 1)
    noisy = scheduler.add_noise(latents, noise, t)
    ptype = scheduler.config.prediction_type
    target = noise if ptype == "epsilon" else scheduler.get_velocity(latents, noise, t)
    dtype = next(denoiser.parameters()).dtype
    pred = denoiser(noisy.to(dtype), t, batch["input_ids"]).float()
    per_row = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    return (per_row * valid).sum() / valid.sum().clamp(min=1.0)
