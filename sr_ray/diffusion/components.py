"""Stable Diffusion components (diffusers): from a model directory or hub id, or tiny ones built in code.

``load_components`` returns the five parts a fine-tune needs (U-Net, VAE, text
encoder, tokenizer, noise scheduler) from a diffusers model directory (local, or
``s3://`` copied once) or a Hugging Face hub id (``stabilityai/stable-diffusion-2-1-base``),
or, for ``model=tiny`` and ``model=tiny-pretrained``, a miniature SD built in code
(:mod:`sr_ray.diffusion.tiny`): the same classes and the same wiring, a few hundred
thousand parameters, so the demo and tests need no download. The tiny tokenizer is
CLIP's real BPE (from the vocabulary open_clip ships), so prompts and the special
token tokenize as they do for SD.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sr_ray.core import storage
from sr_ray.core.config import ConfigError
from sr_ray.diffusion.tiny import (
    TOKENIZER_CACHE,
    clip_bpe_tokenizer,
    tiny_components,
    tiny_generator_state,
    tiny_pretrained_components,
    tiny_vae_state,
    training_scheduler,
)

log = logging.getLogger(__name__)

TINY = "tiny"
TINY_PRETRAINED = "tiny-pretrained"
SD21_RANDOM = "sd21-base-random"


@dataclass
class SDModelConfig:
    name: str = TINY
    """tiny (built in code, U-Net and text encoder random), tiny-pretrained (the same, pre-trained once per machine
    on captioned pictures: the demo's baseline generator), sd21-base-random (SD 2.1-base's architecture with
    random weights, built in code: for throughput benchmarks on a GPU), a diffusers model directory (local or
    s3://), or a hub id
    (stabilityai/stable-diffusion-2-1-base: the paper's model)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub id."""
    seed: int = 0
    """Seed of the tiny model's initial weights."""
    prediction_type: str | None = None
    """Override the scheduler's prediction type (epsilon or v_prediction); none: the model's own."""

    def __post_init__(self) -> None:
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError("prediction_type must be epsilon, v_prediction or null")


def prepare_model(name: str) -> None:
    """Driver-side, before workers start: fit and cache the tiny VAE (and pre-train the tiny generator) once, so
    workers only load them."""
    if name in (TINY, TINY_PRETRAINED):
        tiny_vae_state()
    if name == TINY_PRETRAINED:
        tiny_generator_state()


def sd21_base_random(seed: int = 0) -> dict[str, Any]:
    """SD 2.1-base's architecture (865M-parameter U-Net, OpenCLIP-H text encoder, 4-level VAE), random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
            use_linear_projection=True)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, hidden_act="gelu", projection_dim=512, max_position_embeddings=77,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), latent_channels=4,
            layers_per_block=2, sample_size=512)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


BUILT_IN = {TINY: tiny_components, TINY_PRETRAINED: tiny_pretrained_components, SD21_RANDOM: sd21_base_random}


def load_tokenizer(cfg: SDModelConfig):
    """The model's CLIP tokenizer; for an s3:// model only its tokenizer folder is copied (data tasks call this)."""
    if cfg.name in BUILT_IN:
        return clip_bpe_tokenizer(Path(os.path.expanduser(TOKENIZER_CACHE)))
    from transformers import CLIPTokenizer

    kw = {"revision": cfg.revision} if cfg.revision else {}
    if storage.is_s3(cfg.name):
        return CLIPTokenizer.from_pretrained(storage.local_copy(storage.join(cfg.name, "tokenizer")), **kw)
    return CLIPTokenizer.from_pretrained(cfg.name, subfolder="tokenizer", **kw)


def load_components(cfg: SDModelConfig) -> dict[str, Any]:
    """U-Net, VAE, text encoder, tokenizer and a DDPM training scheduler (the model's own config)."""
    from diffusers import DDPMScheduler

    if cfg.name in BUILT_IN:
        parts = BUILT_IN[cfg.name](cfg.seed)
        parts["noise_scheduler"] = training_scheduler()
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        src = storage.local_copy(cfg.name, "sr-ray-sd-")
        kw = {"revision": cfg.revision} if cfg.revision else {}
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw),
            "vae": AutoencoderKL.from_pretrained(src, subfolder="vae", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw),
            "noise_scheduler": DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw),
        }
    parts["tokenizer"] = load_tokenizer(cfg)
    if cfg.prediction_type:
        parts["noise_scheduler"] = DDPMScheduler.from_config(parts["noise_scheduler"].config,
                                                             prediction_type=cfg.prediction_type)
    return parts


def check_model(cfg: SDModelConfig) -> None:
    """Fail before Ray starts when a local model directory lacks a component (names the folder)."""
    if cfg.name in BUILT_IN or storage.is_s3(cfg.name) or not os.path.exists(cfg.name):
        return  # hub ids and S3 are checked where they load
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not os.path.isdir(os.path.join(cfg.name, c))]
    if missing:
        raise ConfigError(f"model.name={cfg.name}: not a diffusers Stable Diffusion directory (no {missing})")


def pipeline(parts: dict[str, Any], scheduler: str = "ddim"):
    """A ``StableDiffusionPipeline`` over ``parts`` with a DDIM (or the training DDPM) sampler, no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = parts["noise_scheduler"]
    if scheduler == "ddim":
        sched = DDIMScheduler.from_config(sched.config)
    return StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                   tokenizer=parts["tokenizer"], unet=parts["unet"], scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
