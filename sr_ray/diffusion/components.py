"""Stable Diffusion components (diffusers): from a model directory or hub id, or tiny ones built in code.

``load_components`` returns the five parts a fine-tune needs (U-Net, VAE, text
encoder, tokenizer, noise scheduler) from a diffusers model directory (local, or
``s3://`` copied once) or a Hugging Face hub id (``stabilityai/stable-diffusion-2-1-base``),
or, for ``model=tiny``, a miniature SD built in code: the same classes and the same
wiring, a few hundred thousand parameters, so the demo and tests need no download.
The tiny tokenizer is CLIP's real BPE (from the vocabulary open_clip ships), so
prompts and the special token tokenize as they do for SD.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sr_ray.core import images, storage
from sr_ray.core.config import ConfigError

log = logging.getLogger(__name__)

TINY = "tiny"
SD21_RANDOM = "sd21-base-random"
TOKENIZER_CACHE = "~/.cache/sr-ray/tiny-sd/tokenizer"


@dataclass
class SDModelConfig:
    name: str = TINY
    """tiny (built in code), sd21-base-random (SD 2.1-base's architecture with random weights, built in code:
    for throughput benchmarks on a GPU), a diffusers model directory (local or s3://), or a hub id
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


def clip_bpe_tokenizer(folder: str | os.PathLike, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with CLIP's BPE, written from open_clip's bundled vocabulary (offline).

    Ids match OpenAI CLIP's (start 49406, end 49407); padding with "!" (id 0), as SD 2.x does.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not (folder / "vocab.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        tmp = folder / f".vocab-{os.getpid()}.json"
        tmp.write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        os.replace(tmp, folder / "vocab.json")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                         model_max_length=model_max_length)


TINY_VAE = {"images": 1024, "size": 32, "steps": 400, "batch": 32, "lr": 2e-3, "kl_weight": 1e-6, "seed": 0}
"""How the tiny VAE is fitted once per machine (the cache file's name holds a hash of this)."""


def _tiny_vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor)


def tiny_vae_state() -> dict[str, Any]:
    """The tiny VAE's weights, fitted once on demo pictures (cached under ``TOKENIZER_CACHE``'s folder).

    A random VAE decodes any latent to noise, so a tiny SD could never draw anything. This one is
    fitted like SD's (reconstruction MSE + a tiny KL, latents sampled from the posterior) on 1,024
    demo pictures (coloured shapes, 32 px), about a minute on 2 CPU cores; its ``scaling_factor``
    makes the latents unit-variance, as 0.18215 does for SD's. Returns {"state_dict", "scaling_factor"}.
    """
    import hashlib

    import numpy as np
    import torch

    key = hashlib.sha256(json.dumps(TINY_VAE, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(os.path.expanduser(TOKENIZER_CACHE)).parent / f"vae-{key}.pt"
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    p = TINY_VAE
    log.info("fitting the tiny SD's VAE once on %d demo pictures (%d steps) -> %s", p["images"], p["steps"], path)
    rng = np.random.default_rng(p["seed"])
    pics = np.stack([np.asarray(images.draw(str(rng.choice(list(images.COLOURS))), str(rng.choice(images.SHAPES)),
                                            rng, p["size"])) for _ in range(p["images"])])
    x_all = torch.tensor(pics).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.random.fork_rng():
        torch.manual_seed(p["seed"])
        vae = _tiny_vae()
        g = torch.Generator().manual_seed(p["seed"])
        opt = torch.optim.Adam(vae.parameters(), lr=p["lr"])
        for _ in range(p["steps"]):
            x = x_all[torch.randint(0, len(x_all), (p["batch"],), generator=g)]
            post = vae.encode(x).latent_dist
            loss = torch.nn.functional.mse_loss(vae.decode(post.sample(generator=g)).sample, x)
            loss = loss + p["kl_weight"] * post.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            std = float(vae.encode(x_all[:256]).latent_dist.mean.std())
    state = {"state_dict": {k: v.detach().clone() for k, v in vae.state_dict().items()}, "scaling_factor": 1 / std}
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(str(path), buf.getvalue())  # atomic: workers that race read a whole file or none
    return state


def tiny_components(seed: int = 0) -> dict[str, Any]:
    """A miniature SD 2.x: 2-block U-Net (cross-attention), 2-block VAE (4 latent channels, /2), 2-layer CLIP text.

    32 px images give 16 px latents; the same classes as the real model, so every code path is the real one.
    U-Net and text encoder are random (``seed``); the VAE is fitted once (:func:`tiny_vae_state`), so the
    tiny model's images are pictures once its U-Net has learned something.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae_state = tiny_vae_state()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=0))
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            attention_head_dim=(2, 4), norm_num_groups=8)
    vae = _tiny_vae(vae_state["scaling_factor"])
    vae.load_state_dict(vae_state["state_dict"])
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def prepare_model(name: str) -> None:
    """Driver-side, before workers start: fit and cache the tiny VAE once, so workers only load it."""
    if name == TINY:
        tiny_vae_state()


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


BUILT_IN = {TINY: tiny_components, SD21_RANDOM: sd21_base_random}


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
        # SD 2.x's training noise schedule
        parts["noise_scheduler"] = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            prediction_type="epsilon", clip_sample=False, steps_offset=1)
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
