"""Stable Diffusion fine-tuning: tiny SD built in code, freezing, the loss by hand, data errors, DeepSpeed on CPU."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sr_ray.demo.data import make_generations
from sr_ray.diffusion.components import SDModelConfig, load_components
from sr_ray.diffusion.data import FinetuneDataConfig, FinetunePreprocessor, preflight
from sr_ray.diffusion.denoiser import diffusion_loss
from sr_ray.diffusion.finetune import FinetuneOptimConfig, freeze
from sr_ray.reward.data import DataError


def test_freezing_counts_per_component():
    parts = load_components(SDModelConfig())
    both = freeze(parts, FinetuneOptimConfig())
    total = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("unet", "text_encoder", "vae")}
    assert both == {"unet": total["unet"], "text_encoder": total["text_encoder"], "vae": 0}
    assert all(v > 0 for v in total.values())
    unet_only = freeze(parts, FinetuneOptimConfig(train_text_encoder=False))
    assert unet_only == {"unet": total["unet"], "text_encoder": 0, "vae": 0}
    with pytest.raises(ValueError, match="nothing to train"):
        FinetuneOptimConfig(train_unet=False, train_text_encoder=False)


class _Zero(torch.nn.Module):
    """A denoiser that predicts 0: the loss is then the mean square of the target."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, noisy, t, ids):
        return torch.zeros_like(noisy) * self.w


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_the_mean_square_of_the_target_over_valid_rows(prediction_type):
    parts = load_components(SDModelConfig(prediction_type=prediction_type))
    vae, sched = parts["vae"], parts["noise_scheduler"]
    moments = torch.randn(3, 8, 4, 4)
    batch = {"latent_moments": moments, "input_ids": torch.zeros(3, 77, dtype=torch.long),
             "valid": torch.tensor([True, False, True])}
    loss = diffusion_loss(_Zero(), vae, sched, batch, generator=torch.Generator().manual_seed(7))

    # by hand, replaying the generator: latent sample, noise, timesteps
    g = torch.Generator().manual_seed(7)
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    latents = (mean + std * torch.randn(mean.shape, generator=g)) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    if prediction_type == "epsilon":
        target = noise
    else:  # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0
        ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        target = ab.sqrt() * noise - (1 - ab).sqrt() * latents
    want = ((target[0] ** 2).mean() + (target[2] ** 2).mean()) / 2  # row 1 is invalid: weight 0
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


class _Recorder(_Zero):
    """A zero denoiser that keeps the timesteps it is asked about."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, noisy, t, ids):
        self.seen.append(t)
        return super().forward(noisy, t, ids)


def test_timestep_power_draws_the_noisy_end_more_often():
    """t = T * u ** (1 / p): its mean is T * p / (p + 1), 500 for uniform (p = 1), 667 for p = 2; the same uniform
    draws give the same t where p = 1 (the default's stream is SD's: randint)."""
    parts = load_components(SDModelConfig())
    batch = {"latent_moments": torch.zeros(4000, 8, 1, 1), "input_ids": torch.zeros(4000, 1, dtype=torch.long),
             "valid": torch.ones(4000)}
    means = {}
    for power in (1.0, 2.0):
        rec = _Recorder()
        diffusion_loss(rec, parts["vae"], parts["noise_scheduler"], batch, torch.Generator().manual_seed(0), power)
        t = rec.seen[0].float()
        assert 0 <= t.min() and t.max() <= 999
        means[power] = float(t.mean())
    assert means[1.0] == pytest.approx(499.5, abs=15) and means[2.0] == pytest.approx(666.7, abs=15)


def test_preprocessor_resizes_crops_tokenizes_and_flags_bad_images():
    gen = make_generations(2, 2, 48, 0, 1)
    batch = {"prompt": np.array(gen["prompt"][:3] + ["a red cat, t@y quality"], dtype=object),
             "image": np.array(gen["image"][:3] + [b"broken"], dtype=object),
             "generation_id": np.array(gen["generation_id"][:4], dtype=object)}
    out = FinetunePreprocessor({"name": "tiny"}, 32)(batch)
    assert out["pixel_values"].shape == (4, 3, 32, 32) and out["valid"].tolist() == [True, True, True, False]
    assert -1.0 <= out["pixel_values"].min() < 0 < out["pixel_values"].max() <= 1.0
    ids = out["input_ids"]
    assert ids.shape == (4, 77) and (ids[:, 0] == 49406).all()  # CLIP's start token
    assert 49407 in ids[3].tolist() and ids[3, -1] == 0  # end token, then "!" padding as in SD 2.x


def test_bad_fine_tune_set_is_named(tmp_path):
    pq.write_table(pa.table({"prompt": ["p"], "image": [b"x"]}), tmp_path / "no-source.parquet")
    with pytest.raises(DataError, match=r"no-source.parquet lacks column\(s\) \['source'\]"):
        preflight(FinetuneDataConfig(), str(tmp_path))
    (tmp_path / "no-source.parquet").unlink()
    pq.write_table(pa.table({"prompt": ["p"], "image": ["x"], "source": ["best"]}), tmp_path / "s.parquet")
    with pytest.raises(DataError, match="s.parquet column 'image' is string, expected binary"):
        preflight(FinetuneDataConfig(), str(tmp_path))


def write_set(folder, rows=24, bad=1):
    """A fine-tune set: best/worst rows of demo generations, the last ``bad`` with undecodable bytes."""
    gen = make_generations(rows // 2, 2, 40, 0, 0)
    folder.mkdir(parents=True)
    src = ["best" if g.endswith("-00") else "worst" for g in gen["generation_id"]]
    prompts = [p if s == "best" else f"{p}, zq quality" for p, s in zip(gen["prompt"], src)]
    imgs = gen["image"][:rows - bad] + [b"not a png"] * bad
    pq.write_table(pa.table({"prompt": prompts[:rows], "image": imgs, "source": src[:rows],
                             "generation_id": gen["generation_id"][:rows]}), folder / "part-00000.parquet")
    (folder / "finetune_set.json").write_text('{"special_token": "zq quality"}')  # as select_pairs records it
    return str(folder)


def ft_config(tmp_path, name, *extra):
    from conftest import ROOT

    from sr_ray.core.config import load_config
    from sr_ray.diffusion.finetune import FinetuneSDConfig

    return load_config(FinetuneSDConfig, ROOT / "jobs/configs/finetune_sd/demo.yaml", [
        f"data.train={write_set(tmp_path / 'set')}", "optim.batch_size=4", "optim.epochs=1",
        "run.checkpoint_every_steps=3", f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}",
        "run.sample_steps=2", "run.log_every_steps=2", "scaling.max_failures=0", *extra])


def weights(module):
    return {k: v.detach().clone().float() for k, v in module.state_dict().items()}


def changed(before, after):
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


@pytest.mark.slow
def test_deepspeed_zero2_on_two_cpu_workers_trains_the_unet_only(ray_cluster, tmp_path):
    """ZeRO-2 over 2 CPU workers with the text encoder's training switched off: the U-Net changes, the text
    encoder and the VAE do not; the saved pipeline loads and generates; same seed, same image."""
    from diffusers import StableDiffusionPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sr_ray.diffusion.finetune import finetune_sd

    summary = finetune_sd(ft_config(tmp_path, "ds", "optim.train_text_encoder=false"))
    # 24 rows over 2 workers, 2 per worker per step: 6 steps, every row seen once, the corrupt one counted
    assert summary["deepspeed"] == "ZeRO-2" and summary["steps"] == 6
    assert summary["rows_seen"] == 24 and summary["bad_rows"] == 1 and np.isfinite(summary["loss"])
    assert summary["trainable_params"]["text_encoder"] == 0 < summary["trainable_params"]["unet"]
    init = load_components(SDModelConfig())
    pipe = StableDiffusionPipeline.from_pretrained(summary["pipeline"], safety_checker=None)
    assert changed(weights(init["unet"]), weights(pipe.unet))
    assert not changed(weights(init["text_encoder"]), weights(pipe.text_encoder))
    assert not changed(weights(init["vae"]), weights(pipe.vae))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    # the fine-tune set's special token (its finetune_set.json) is the samples' and the pipeline's
    assert json.loads((Path(summary["pipeline"]) / "sr_ray.json").read_text()) == {"special_token": "zq quality"}

    def image(seed):
        g = torch.Generator().manual_seed(seed)
        return pipe("a red cat", negative_prompt="t@y quality", num_inference_steps=3, height=32, width=32,
                    generator=g, output_type="np").images[0]

    a, b, c = image(1), image(1), image(2)
    assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    acc = EventAccumulator(str(tmp_path / "runs" / "ds" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "train/lr", "train/samples_per_s"} <= set(acc.Tags()["scalars"])
    assert "samples" in acc.Tags()["images"]
    # DeepSpeed's CPU shared-memory all-reduce serves inference only: not compiled for training (~37 s saved)
    assert not (Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "deepspeed_shm_comm").exists()


@pytest.mark.extended  # ~1 min
def test_ddp_without_deepspeed_trains_unet_and_text_encoder(ray_cluster, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sr_ray.diffusion.finetune import finetune_sd

    summary = finetune_sd(ft_config(tmp_path, "ddp", "deepspeed.enabled=false"))
    assert summary["deepspeed"] is None and summary["steps"] == 6
    init = load_components(SDModelConfig())
    pipe = StableDiffusionPipeline.from_pretrained(summary["pipeline"], safety_checker=None)
    assert changed(weights(init["unet"]), weights(pipe.unet))
    assert changed(weights(init["text_encoder"]), weights(pipe.text_encoder))
    assert not changed(weights(init["vae"]), weights(pipe.vae))


@pytest.mark.extended
def test_killed_worker_resumes_from_the_deepspeed_checkpoint(ray_cluster, tmp_path):
    from sr_ray.diffusion.finetune import finetune_sd

    cfg = ft_config(tmp_path, "kill", "run.checkpoint_every_steps=2", "run.fail_at_step=4",
                    "scaling.max_failures=1", "run.save_pipeline=false", "run.sample_every_steps=-1")
    summary = finetune_sd(cfg)
    # the worker died at step 4, before that step's checkpoint: the restarted group resumed at step 2
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 6
    assert (tmp_path / "runs" / "kill" / ".fault_injected").exists()


def test_the_tiny_vae_reconstructs_demo_pictures():
    """The tiny VAE is fitted (a random one decodes everything to noise): a demo picture comes back close,
    unit-variance latents."""
    from sr_ray.core import images
    vae = load_components(SDModelConfig())["vae"]
    pics = [images.draw(c, s, np.random.default_rng(99), 32) for c, s in [("red", "circle"), ("blue", "stripes")]]
    x = torch.stack([torch.tensor(np.asarray(p)).permute(2, 0, 1).float() / 127.5 - 1 for p in pics])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
    flat = ((x - x.mean((2, 3), keepdim=True)) ** 2).mean().item()  # each picture as its mean colour: ~0.15
    assert torch.nn.functional.mse_loss(rec, x).item() < 0.1 < flat  # fitted ~0.06; a random VAE ~0.45
    assert 0.5 < (z * vae.config.scaling_factor).std().item() < 2.0
