"""Scoring with a trained reward model: one code path for validation, test,
batch scoring and the Python / CLI API.

A checkpoint is a folder with ``model.pt`` ({"model_config", "state_dict",
"full"}); when ``full`` is false it holds only the trained parameters and the
rest comes from the ``pretrained`` weights named in ``model_config``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from sr_ray.core import identity, images, stats, storage
from sr_ray.core.errors import DataError
from sr_ray.reward.data import triplet_dataset
from sr_ray.reward.model import ModelConfig, RewardModel, build_clip, image_transform, preprocess_cfg, tokenizer

MODEL_FILE = "model.pt"
EXPORT_CONFIG = "open_clip_config.json"
EXPORT_WEIGHTS = "open_clip_model.safetensors"
"""An exported model folder (:mod:`sr_ray.reward.export`): open_clip's hub layout, safetensors weights."""
HUB_PREFIX = "hf-hub:"


def pairwise_accuracy(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> tuple[float, int]:
    """(sum of correct, count): score(pos) > score(neg) counts 1, a tie counts 1/2.

    (The authors' code counts a tie as correct; half is the unbiased choice.)
    Returns the sum, not the mean, so shards and workers can be added up.
    """
    correct = (pos_scores > neg_scores).sum().item() + 0.5 * (pos_scores == neg_scores).sum().item()
    return float(correct), int(pos_scores.numel())


def model_state(model: RewardModel, cfg: ModelConfig, full: bool) -> dict:
    """What a checkpoint stores: every parameter, or only the trainable ones on top of pretrained weights."""
    clip = model.clip
    if full or not cfg.pretrained:
        state = clip.state_dict()
        full = True
    else:
        state = {k: v for k, v in clip.named_parameters() if v.requires_grad}
    return {"model_config": cfg.__dict__.copy(), "full": full,
            "state_dict": {k: v.detach().cpu().clone() for k, v in state.items()}}


def save_model(path: str | os.PathLike, model: RewardModel, cfg: ModelConfig, full: bool = False) -> None:
    torch.save(model_state(model, cfg, full), Path(path) / MODEL_FILE)


_COPIES: dict[tuple[str, str], str] = {}  # (s3 URI, its files' fingerprint) -> local copy, per process


def _local_copy(checkpoint: str) -> str:
    """An s3:// checkpoint copied to local disk once per process (again only when its files changed)."""
    if not storage.is_s3(checkpoint):
        return checkpoint
    key = (checkpoint, identity.folder_fingerprint(checkpoint))
    if key not in _COPIES:
        _COPIES[key] = storage.local_copy(checkpoint, "sr-ray-ckpt-")
    return _COPIES[key]


def model_file(checkpoint: str) -> Path:
    """The local ``model.pt`` of a checkpoint folder (local or s3://, copied once) or file; DataError if none."""
    try:
        local = Path(_local_copy(str(checkpoint)))
    except (OSError, ValueError) as e:
        raise DataError(f"checkpoint={storage.redact(checkpoint)}: cannot read it ({e})") from None
    f = local / MODEL_FILE if local.is_dir() else local
    if not f.is_file():
        what = "does not exist" if not local.exists() else f"holds no {MODEL_FILE}"
        raise DataError(f"checkpoint={storage.redact(checkpoint)} {what} (not an sr-ray reward checkpoint)")
    return f


def read_checkpoint(checkpoint: str, mmap: bool = False) -> dict:
    """The ``model.pt`` dict of a reward checkpoint, loaded with ``weights_only=True`` (tensors and plain
    values only: never an arbitrary pickle); anything else is a DataError naming the file."""
    f = model_file(checkpoint)
    try:
        blob = torch.load(f, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a text file: "mmap ..." or "invalid load key"; a foreign pickle: "Unsupported global"
        raise DataError(f"checkpoint={storage.redact(checkpoint)}: {f} is not an sr-ray reward checkpoint "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    missing = [k for k in ("model_config", "state_dict", "full") if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise DataError(f"checkpoint={storage.redact(checkpoint)}: {f} lacks {missing} (not an sr-ray reward "
                        f"checkpoint)")
    return blob


def exported_folder(checkpoint: str) -> str | None:
    """The local folder of an exported model (a folder, an s3:// folder copied once, or ``hf-hub:org/name``
    downloaded by huggingface_hub), or None when ``checkpoint`` is not one."""
    if checkpoint.startswith(HUB_PREFIX):
        from huggingface_hub import snapshot_download

        return snapshot_download(checkpoint[len(HUB_PREFIX):])
    try:
        local = Path(_local_copy(str(checkpoint)))
    except (OSError, ValueError):
        return None
    if (local / EXPORT_CONFIG).is_file() and (local / EXPORT_WEIGHTS).is_file() and not (local / MODEL_FILE).exists():
        return str(local.resolve())
    return None


def run_checkpoint(uri: str) -> str:
    """A training run folder -> the best checkpoint its ``summary.json`` names; anything else as it is."""
    uri = str(uri)
    if uri.startswith(HUB_PREFIX) or storage.exists(storage.join(uri, MODEL_FILE)) or \
            storage.exists(storage.join(uri, EXPORT_CONFIG)):
        return uri
    summary = storage.join(uri, "summary.json")
    if storage.exists(summary):
        best = json.loads(storage.read_bytes(summary)).get("checkpoint")
        if best:
            return best
    return uri


def load_model(checkpoint: str, device: str | torch.device = "cpu") -> tuple[RewardModel, ModelConfig]:
    """A checkpoint folder, a training run (its best checkpoint) or an exported model folder (local or s3://, or
    ``hf-hub:org/name``) -> (RewardModel in eval mode, its ModelConfig). An export's weights are safetensors."""
    checkpoint = run_checkpoint(checkpoint)
    exported = exported_folder(checkpoint)
    if exported is not None:
        cfg = ModelConfig(name=f"local-dir:{exported}", pretrained=None, unfreeze_vision_blocks=0,
                          unfreeze_text_blocks=0)
        return RewardModel(build_clip(cfg)).to(device).eval(), cfg
    blob = read_checkpoint(checkpoint)
    cfg = ModelConfig(**blob["model_config"])
    clip = build_clip(cfg, load_weights=not blob["full"])
    missing, unexpected = clip.load_state_dict(blob["state_dict"], strict=blob["full"])
    if unexpected:
        raise ValueError(f"{checkpoint}: checkpoint keys not in {cfg.name}: {unexpected[:5]}")
    model = RewardModel(clip).to(device).eval()
    return model, cfg


def preprocess_pixels(x: torch.Tensor, pcfg: dict) -> torch.Tensor:
    """open_clip's eval transform on a (B, 3, H, W) float tensor in [0, 1], differentiably: resize (shortest side,
    or squash) with antialiased bicubic/bilinear, centre crop, normalize."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    size = pcfg["size"]
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    mode = InterpolationMode.BILINEAR if pcfg.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC
    resize_mode = pcfg.get("resize_mode") or "shortest"
    if resize_mode == "squash":
        x = TF.resize(x, list(size), interpolation=mode, antialias=True) if tuple(x.shape[-2:]) != size else x
    elif resize_mode == "shortest" and size[0] == size[1]:
        if min(x.shape[-2:]) != size[0]:
            x = TF.resize(x, size[0], interpolation=mode, antialias=True)
        x = TF.center_crop(x, list(size))
    else:
        raise ValueError(f"score_pixels: resize_mode {resize_mode!r} with size {size} is not supported")
    mean = torch.tensor(pcfg["mean"], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(pcfg["std"], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def to_pil(x):
    """A PIL image, encoded bytes or a path (local or s3://) -> an RGB PIL image."""
    from PIL import Image

    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, (bytes, bytearray)):
        return images.decode(bytes(x))
    return images.decode(storage.read_bytes(str(x)))


def inference_autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 (no autocast) elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


class TripletScorer:
    """Callable class for ``map_batches``: preprocessed triplets -> ``pos_score``, ``neg_score``, ``valid``."""

    def __init__(self, checkpoint: str, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, _ = load_model(checkpoint, self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        dev = self.device
        with inference_autocast(dev):
            t, p, n = self.model(torch.as_tensor(batch["tokens"], device=dev),
                                 torch.as_tensor(batch["pos"], device=dev),
                                 torch.as_tensor(batch["neg"], device=dev))
        return {"pos_score": RewardModel.score(t, p).float().cpu().numpy(),
                "neg_score": RewardModel.score(t, n).float().cpu().numpy(),
                "prompt_id": np.asarray(batch["prompt_id"]), "valid": np.asarray(batch["valid"])}


def evaluate_split(checkpoint: str, info, model_cfg: dict, data_cfg, batch_size: int = 256,
                   actors: int | None = None) -> dict[str, float]:
    """Pairwise accuracy of a checkpoint on a triplet split, scored over Ray Data.

    ``actors``: size of the scorer actor pool; ``0`` scores in this process (no
    actor start-up, right for small splits); default: 0 up to 20K triplets, else 2.
    """
    import ray.data

    if actors is None:
        actors = 0 if info.rows <= 20_000 else 2
    ds = triplet_dataset(info, model_cfg, data_cfg)
    if actors:
        ds = ds.map_batches(TripletScorer, fn_constructor_kwargs={"checkpoint": checkpoint}, batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                            num_cpus=data_cfg.map_num_cpus)
        batches = ds.iter_batches(batch_size=4096, batch_format="numpy")
    else:
        scorer = TripletScorer(checkpoint)
        batches = (scorer(b) for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    correct = count = bad = 0.0
    pos, neg, pids = [], [], []
    for b in batches:
        v = b["valid"].astype(bool)
        c, k = pairwise_accuracy(torch.as_tensor(b["pos_score"][v]), torch.as_tensor(b["neg_score"][v]))
        correct, count, bad = correct + c, count + k, bad + int((~v).sum())
        pos.append(b["pos_score"][v])
        neg.append(b["neg_score"][v])
        pids.append(b["prompt_id"][v])
    out = {"pairwise_accuracy": correct / count if count else float("nan"), "triplets": int(count),
           "bad_rows": int(bad)}
    if count:  # a 95 % interval resampling prompts (triplets of one prompt are not independent)
        e = stats.pairwise_accuracy(np.concatenate(pos), np.concatenate(neg), np.concatenate(pids), "half", 1000)
        out.update(ci_low=e.ci_low, ci_high=e.ci_high, prompts=e.clusters)
    return out


class RewardScorer:
    """Score (prompt, image) pairs with a trained checkpoint: ``score(prompts, images) -> (N,) float32``.

    >>> scorer = RewardScorer("runs/demo/checkpoint_...")
    >>> scorer.score("a red cat", ["a.jpg", "b.png"])  # one prompt for all images
    """

    def __init__(self, checkpoint: str, device: str | None = None, batch_size: int = 64):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._use(*load_model(checkpoint, self.device), batch_size)

    @classmethod
    def from_model(cls, model: RewardModel, cfg: ModelConfig, device: str | None = None,
                   batch_size: int = 64) -> "RewardScorer":
        """A scorer over a model already built (e.g. an original open_clip CLIP: the CLIP alignment metric)."""
        self = cls.__new__(cls)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._use(model.to(self.device).eval(), cfg, batch_size)
        return self

    def _use(self, model: RewardModel, cfg: ModelConfig, batch_size: int) -> None:
        self.model, self.cfg = model, cfg
        self.transform = image_transform(preprocess_cfg(cfg))
        self.tokenizer = tokenizer(cfg)
        self.batch_size = batch_size

    def score_pixels(self, pixels: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        """Differentiable scores of (B, 3, H, W) pixels in [0, 1]: the model's preprocessing done in torch (resize,
        centre crop, normalize), so gradients reach the pixels (ReFL / DRaFT-style direct reward fine-tuning).
        Matches :meth:`score` exactly when no resize is needed; a resize is torch's antialiased bicubic instead
        of PIL's (see tests/test_rl.py for the measured difference)."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels: expected (B, 3, H, W) in [0, 1], got {tuple(pixels.shape)}")
        prompts = [prompts] * len(pixels) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(pixels):
            raise ValueError(f"{len(prompts)} prompts for {len(pixels)} images")
        x = preprocess_pixels(pixels.to(self.device, torch.float32), preprocess_cfg(self.cfg))
        uniq = sorted(set(prompts))
        with inference_autocast(self.device):
            t = self.model.encode_text(self.tokenizer(uniq).to(self.device))
            im = self.model.encode_image(x)
        idx = torch.tensor([uniq.index(p) for p in prompts], device=self.device)
        return RewardModel.score(t[idx], im).float()

    @torch.no_grad()
    def score(self, prompts: str | Sequence[str], imgs: Iterable) -> np.ndarray:
        imgs = list(imgs)
        if isinstance(prompts, str):
            prompts = [prompts] * len(imgs)
        if len(prompts) != len(imgs):
            raise ValueError(f"{len(prompts)} prompts for {len(imgs)} images")
        out = []
        for s in range(0, len(imgs), self.batch_size):
            ps, xs = prompts[s:s + self.batch_size], imgs[s:s + self.batch_size]
            uniq = sorted(set(ps))  # each distinct prompt is encoded once
            with inference_autocast(self.device):
                t = self.model.encode_text(self.tokenizer(uniq).to(self.device))
                pix = torch.stack([self.transform(to_pil(x)) for x in xs]).to(self.device)
                im = self.model.encode_image(pix)
            idx = torch.tensor([uniq.index(p) for p in ps], device=self.device)
            out.append(RewardModel.score(t[idx], im).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)




def reward_fn(checkpoint: str, device: str | None = None, batch_size: int = 64):
    """A reward for diffusion RL trainers, in the DDPO signature (TRL's former ``DDPOTrainer``, ddpo-pytorch;
    Flow-GRPO and DanceGRPO call theirs the same way): ``fn(images, prompts, metadata) -> (scores, metadata)``.

    ``images``: a (B, 3, H, W) float tensor in [0, 1] (a pipeline's ``output_type="pt"``), a (B, H, W, 3) uint8
    array, or a list of PIL images / encoded bytes / paths; ``prompts``: B strings; ``scores``: a (B,) float32
    CPU tensor, no gradient (use :meth:`RewardScorer.score_pixels` for gradients). ``checkpoint``: a checkpoint,
    a run's checkpoint, or an exported folder (local, s3://, hf-hub:org/name), or the URL of a running
    ``sr-ray serve`` app (``http://host:8000``): then images are sent as PNG to its ``/score``, where they join
    its batches.
    """
    if str(checkpoint).startswith(("http://", "https://")):
        return _served_reward(str(checkpoint).rstrip("/"), batch_size)
    scorer = RewardScorer(checkpoint, device=device, batch_size=batch_size)

    def fn(images, prompts, metadata=None):
        prompts = list(prompts) if not isinstance(prompts, str) else [prompts] * len(images)
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3:
            images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        if torch.is_tensor(images):
            with torch.no_grad():
                parts = [scorer.score_pixels(images[s:s + batch_size], prompts[s:s + batch_size]).cpu()
                         for s in range(0, len(images), batch_size)]
            scores = torch.cat(parts) if parts else torch.zeros(0)
        else:
            scores = torch.from_numpy(scorer.score(prompts, images))
        return scores.float(), {"reward_model": storage.redact(str(checkpoint))}

    return fn


def _as_pil_list(imgs) -> list:
    from PIL import Image

    if torch.is_tensor(imgs):
        imgs = (imgs.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if isinstance(imgs, np.ndarray):
        return [Image.fromarray(a) for a in imgs]
    return [to_pil(x) for x in imgs]


def _served_reward(url: str, batch_size: int):
    """The DDPO-style reward as a client of a Serve app's ``/score`` (one request per ``batch_size`` images)."""
    import base64
    import urllib.request

    def fn(imgs, prompts, metadata=None):
        pil = _as_pil_list(imgs)
        prompts = [prompts] * len(pil) if isinstance(prompts, str) else list(prompts)
        out = []
        for s in range(0, len(pil), batch_size):
            items = [{"prompt": p, "images": [base64.b64encode(images.encode_png(im)).decode()]}
                     for p, im in zip(prompts[s:s + batch_size], pil[s:s + batch_size])]
            req = urllib.request.Request(f"{url}/score", data=json.dumps(items).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                out += [x["scores"][0] for x in json.loads(r.read())["results"]]
        return torch.tensor(out, dtype=torch.float32), {"reward_model": url}

    return fn
