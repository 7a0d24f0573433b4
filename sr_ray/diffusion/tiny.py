"""The tiny Stable Diffusion built in code, for the demo and the tests: no download, the real diffusers classes.

- :func:`clip_bpe_tokenizer`: CLIP's real BPE, written from the vocabulary open_clip ships;
- :func:`tiny_components`: a 2-block U-Net with cross-attention, a 2-block VAE, a 2-layer CLIP text encoder;
  the U-Net and text encoder random (by seed), the VAE fitted once per machine (:func:`tiny_vae_state`);
- :func:`tiny_pretrained_components` (``model=tiny-pretrained``): the same model with its U-Net and text
  encoder pre-trained once per machine on captioned pictures (:func:`tiny_generator_state`): the demo's
  baseline generator, which draws the shape and colour a prompt names now and then, as a small text-to-image
  model does, and knows nothing of any community's taste.

Everything fitted here is cached under ``~/.cache/sr-ray/tiny-sd`` in a file named by a hash of its recipe
(``TINY_VAE``, ``TINY_GENERATOR``), written atomically, so Ray workers that race read a whole file or none.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sr_ray.core import images, storage
from sr_ray.demo.data import captioned_pictures

log = logging.getLogger(__name__)

TOKENIZER_CACHE = "~/.cache/sr-ray/tiny-sd/tokenizer"


def cache_file(kind: str, recipe: dict) -> Path:
    """Where a fitted tiny part is kept: ``<kind>-<hash of its recipe>.pt`` beside the tokenizer."""
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return Path(os.path.expanduser(TOKENIZER_CACHE)).parent / f"{kind}-{key}.pt"


def save_state(state: dict, path: Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(str(path), buf.getvalue())  # atomic: workers that race read a whole file or none


def training_scheduler():
    """SD 2.x's training noise schedule (DDPM, epsilon)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type="epsilon", clip_sample=False, steps_offset=1)


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
    import numpy as np
    import torch

    path = cache_file("vae", TINY_VAE)
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
    save_state(state, path)
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


TINY_GENERATOR = {"images": 2048, "size": 32, "steps": 900, "batch": 32, "lr": 3e-3, "weight_decay": 1e-2,
                  "caption_dropout": 0.1, "timestep_power": 2.0, "captions": "described", "seed": 0}
"""How the tiny generator is pre-trained once per machine (the cache file's name holds a hash of this and of
``TINY_VAE``): noise prediction on captioned pictures (``sr_ray.demo.data.captioned_pictures``: short captions
and longer descriptions in prompt words), a caption dropped (to "") one time in ten so classifier-free guidance
has an unconditional model to steer from, timesteps drawn towards the noisy end (``timestep_power``), where a
picture's colour is decided: with uniform ones the 2-layer text encoder needs ~2x the steps to follow colours."""


def tiny_generator_file() -> Path:
    """The pre-trained tiny generator's cache file: its name changes with the recipe (``TINY_GENERATOR``,
    ``TINY_VAE``), so a run made from an older recipe can tell."""
    return cache_file("generator", {**TINY_GENERATOR, "vae": TINY_VAE})


def tiny_generator_state() -> dict[str, Any]:
    """The pre-trained tiny generator's U-Net and text encoder weights: {"unet", "text_encoder"} state dicts.

    Fitted once per machine (about 4½ minutes on 2 CPU cores) on 2,048 pictures at 32 px, each captioned with
    the colour and shape it shows ("a red circle on a plain background, watercolor", "a tiny red cat made of
    circles on a beach, watercolor"), then cached. The result draws the colour a community prompt names in
    about a third of its images at guidance 3 (chance: one in eight), different colours across seeds.
    """
    import torch

    from sr_ray.diffusion.denoiser import Denoiser, diffusion_loss

    p = TINY_GENERATOR
    path = tiny_generator_file()
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    log.info("pre-training the tiny generator once on %d captioned pictures (%d steps) -> %s",
             p["images"], p["steps"], path)
    captions, pics = captioned_pictures(p["images"], p["size"], p["seed"])
    parts = tiny_components(p["seed"])
    tok = clip_bpe_tokenizer(Path(os.path.expanduser(TOKENIZER_CACHE)))
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids[0]
    vae = parts["vae"].requires_grad_(False)
    x = torch.from_numpy(pics).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        moments = torch.cat([vae.encode(x[s:s + 256]).latent_dist.parameters for s in range(0, len(x), 256)])
    model, sched = Denoiser(parts["unet"], parts["text_encoder"]), training_scheduler()
    with torch.random.fork_rng():
        torch.manual_seed(p["seed"])
        g = torch.Generator().manual_seed(p["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
        t0 = time.perf_counter()
        for step in range(1, p["steps"] + 1):
            idx = torch.randint(0, len(x), (p["batch"],), generator=g)
            batch_ids = ids[idx].clone()
            batch_ids[torch.rand(p["batch"], generator=g) < p["caption_dropout"]] = empty
            loss = diffusion_loss(model, vae, sched, {"latent_moments": moments[idx], "input_ids": batch_ids,
                                                      "valid": torch.ones(p["batch"])}, g, p["timestep_power"])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 100 == 0 or step == p["steps"]:
                log.info("[tiny generator] step %d/%d loss %.4f %.0fs", step, p["steps"], loss.item(),
                         time.perf_counter() - t0)
    state = {k: {n: v.detach().clone() for n, v in parts[k].state_dict().items()} for k in ("unet", "text_encoder")}
    save_state(state, path)
    return state


def tiny_pretrained_components(seed: int = 0) -> dict[str, Any]:
    """The tiny SD with the pre-trained generator's U-Net and text encoder (:func:`tiny_generator_state`); the
    weights are the same for every ``seed``."""
    state = tiny_generator_state()
    parts = tiny_components(seed)
    for k in ("unet", "text_encoder"):
        parts[k].load_state_dict(state[k])
    return parts
