"""The Social Reward model: an open_clip CLIP whose score is cos(prompt, image).

One builder (:func:`build_clip`), one explicit freeze (:func:`freeze`), one
module (:class:`RewardModel`) that training, validation and scoring share.
Tiny architectures for demos and tests live as JSON in ``model_configs/``
beside this file (architecture as data, as open_clip does) and need no download.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from sr_ray.core import storage
from sr_ray.core.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


@dataclass
class ModelConfig:
    """Which CLIP, which weights, which parts train."""

    SIGNED: ClassVar[tuple[str, ...]] = ("unfreeze_vision_blocks", "unfreeze_text_blocks")  # -1: whole tower

    name: str = "sr-tiny"
    """open_clip architecture name (``open_clip.list_models()``), e.g. ``ViT-L-14``, or ``local-dir:/path``."""
    pretrained: str | None = None
    """open_clip ``pretrained`` tag (``openai``), a local or s3:// checkpoint file, or null for random init."""
    unfreeze_vision_blocks: int = 2
    """Last N residual blocks of the image tower that train (+ its final norm and projection when N > 0); -1 = whole tower."""
    unfreeze_text_blocks: int = 2
    """Last N residual blocks of the text tower that train (+ ln_final and text projection when N > 0); -1 = whole tower."""
    train_image_projection: bool = True
    """With N > 0 vision blocks: also train the image tower's projection (``visual.proj``, a timm trunk's
    ``visual.head``). The authors' optimizer leaves ``visual.proj`` out (paper.yaml: false)."""

    def __post_init__(self) -> None:
        if self.unfreeze_vision_blocks < -1 or self.unfreeze_text_blocks < -1:
            raise ValueError("unfreeze_*_blocks must be >= 0, or -1 for the whole tower")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# (blocks, [final norm / projection ...]) per tower layout that open_clip builds.
_VISION_LAYOUTS = [
    ("visual.transformer.resblocks", ["visual.attn_pool", "visual.ln_post", "visual.proj"]),  # open_clip ViT
    ("visual.trunk.blocks", ["visual.trunk.norm", "visual.trunk.fc_norm", "visual.head"]),  # timm trunk
]
_TEXT_LAYOUTS = [
    ("transformer.resblocks", ["ln_final", "text_projection"]),  # CLIP
    ("text.transformer.resblocks", ["text.ln_final", "text.text_projection"]),  # CustomTextCLIP
    ("text.transformer.encoder.layer", ["text.pooler", "text.proj"]),  # HF text tower
]
_TOWER_ROOTS = {"vision": ["visual"], "text": ["text", "transformer", "token_embedding",
                                              "positional_embedding", "ln_final", "text_projection"]}


def tower_parts(model: nn.Module, tower: str) -> tuple[Sequence[nn.Module], list[nn.Module | nn.Parameter]]:
    """(residual blocks, final norm/projection parts) of ``tower`` ('vision' or 'text')."""
    layouts = _VISION_LAYOUTS if tower == "vision" else _TEXT_LAYOUTS
    for blocks_path, finals in layouts:
        blocks = _get(model, blocks_path)
        if blocks is not None:
            return list(blocks), [p for p in (_get(model, f) for f in finals) if p is not None]
    raise NotImplementedError(
        f"unfreezing blocks of the {tower} tower of {type(model).__name__} is not supported "
        f"(known layouts: {[b for b, _ in layouts]}); use unfreeze_{tower}_blocks=0 or -1"
    )


def _set_trainable(part: nn.Module | nn.Parameter) -> None:
    if isinstance(part, nn.Parameter):
        part.requires_grad_(True)
    else:
        part.requires_grad_(True)


IMAGE_PROJECTIONS = ("visual.proj", "visual.head")


def freeze(model: nn.Module, unfreeze_vision_blocks: int, unfreeze_text_blocks: int,
           image_projection: bool = True) -> None:
    """Freeze everything, then make the last N blocks (+ final norm and projection) of each tower trainable.

    Frozen parameters get ``requires_grad_(False)``, so autograd computes no
    gradient for them (the authors' ``model.requires_grad = False`` freezes nothing).
    ``-1`` makes the whole tower trainable. ``image_projection=False`` keeps the image tower's projection
    (``visual.proj``) frozen when N > 0 vision blocks train, as the authors' optimizer does.
    """
    model.requires_grad_(False)
    for tower, n in (("vision", unfreeze_vision_blocks), ("text", unfreeze_text_blocks)):
        if n == 0:
            continue
        if n == -1:
            for root in _TOWER_ROOTS[tower]:
                part = _get(model, root)
                if part is not None:
                    _set_trainable(part)
            continue
        blocks, finals = tower_parts(model, tower)
        if n > len(blocks):
            raise ValueError(
                f"model.unfreeze_{tower}_blocks={n} but the {tower} tower has only {len(blocks)} blocks"
            )
        if tower == "vision" and not image_projection:
            skip = [_get(model, name) for name in IMAGE_PROJECTIONS]
            finals = [f for f in finals if not any(f is q for q in skip)]
        for part in list(blocks[-n:]) + finals:
            _set_trainable(part)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _local_weights(pretrained: str | None) -> str | None:
    """s3:// checkpoint files are fetched to a local temp file (open_clip reads local paths)."""
    if pretrained and storage.is_s3(pretrained):
        data = storage.read_bytes(pretrained)
        fd, path = tempfile.mkstemp(suffix=Path(pretrained).suffix or ".pt")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path
    return pretrained or None


def activation_problem(name: str, pretrained: str | None) -> str | None:
    """Why the architecture ``name`` does not fit the pretrained tag ``pretrained`` (None when it does).

    OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain ``ViT-L-14`` uses GELU, and
    ``create_model("ViT-L-14", pretrained="openai")`` only logs a warning while every embedding comes out
    degraded. The tag's config says which activation its weights need; the architecture's must agree.
    """
    if not pretrained or name.startswith(("local-dir:", "hf-hub:")) or os.path.isfile(pretrained) \
            or storage.is_s3(pretrained):
        return None
    tag = open_clip.get_pretrained_cfg(name, pretrained) or {}
    if not tag:
        return None
    want = bool(tag.get("quick_gelu", False))
    have = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    if want == have:
        return None
    base = name[:-len("-quickgelu")] if name.endswith("-quickgelu") else name
    fix = f"{base}-quickgelu" if want else base
    return (f"model.name={name!r} uses {'QuickGELU' if have else 'GELU'} but the {pretrained!r} weights were "
            f"trained with {'QuickGELU' if want else 'GELU'}: use model.name={fix!r}")


def build_clip(cfg: ModelConfig, load_weights: bool = True) -> nn.Module:
    """The open_clip model of ``cfg``, in fp32 on the CPU, frozen per ``cfg``."""
    problem = activation_problem(cfg.name, cfg.pretrained)
    if problem:
        raise ConfigError(problem)
    known = set(open_clip.list_models())
    if not cfg.name.startswith(("local-dir:", "hf-hub:")) and cfg.name not in known:
        raise ValueError(f"model.name={cfg.name!r} is not an open_clip architecture; "
                         f"e.g. {sorted(known)[:8]} ... (open_clip.list_models())")
    pretrained = _local_weights(cfg.pretrained) if load_weights else None
    if pretrained and not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(cfg.name, pretrained):
        raise ValueError(
            f"model.pretrained={cfg.pretrained!r} is neither a file nor a pretrained tag of {cfg.name} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(cfg.name)})"
        )
    model = open_clip.create_model(cfg.name, pretrained=pretrained)
    freeze(model, cfg.unfreeze_vision_blocks, cfg.unfreeze_text_blocks, cfg.train_image_projection)
    return model


def preprocess_cfg(cfg: ModelConfig) -> dict[str, Any]:
    """The model's own image preprocessing (size, mean, std, interpolation, resize mode) without building it."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    base = asdict(PreprocessCfg())
    if cfg.name.startswith("local-dir:"):
        import json

        with open(Path(cfg.name[len("local-dir:"):]) / "open_clip_config.json") as f:
            cfg_json = json.load(f)
        base = merge_preprocess_dict(base, cfg_json.get("preprocess_cfg", {}))
        base["size"] = cfg_json["model_cfg"]["vision_cfg"].get("image_size", base["size"])
        return base
    model_cfg = open_clip.get_model_config(cfg.name) or {}
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    if size is not None:
        base["size"] = size
    if cfg.pretrained and not os.path.isfile(cfg.pretrained) and not storage.is_s3(cfg.pretrained):
        base = merge_preprocess_dict(base, open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained) or {})
    return base


def image_transform(pcfg: dict[str, Any]):
    """The eval transform of open_clip for a :func:`preprocess_cfg` dict: PIL image -> (3, H, W) float tensor."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in pcfg.items()}
    return image_transform_v2(PreprocessCfg(**fields), is_train=False)


def pixel_transform(pcfg: dict[str, Any]):
    """The geometric part of :func:`image_transform` (resize, crop, RGB): PIL image -> (H, W, 3) uint8 array.

    Scoring sends these bytes through the object store (4x fewer than float32) and finishes on the device
    with :func:`normalize_pixels`; the two halves compute exactly what :func:`image_transform` does."""
    import numpy as np
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = image_transform(pcfg).transforms
    tail = [type(t) for t in steps[-2:]]
    if len(steps) < 2 or not issubclass(tail[0], ToTensor) or not issubclass(tail[1], Normalize):
        raise ConfigError(f"open_clip's eval transform no longer ends with ToTensor, Normalize: {steps}")
    geometric = Compose(steps[:-2])
    return lambda img: np.asarray(geometric(img), dtype=np.uint8)


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, as ToTensor then Normalize compute it (on any device)."""
    x = pixels.permute(0, 3, 1, 2).float().div(255)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub(m).div(s)


def tokenizer(cfg: ModelConfig):
    """open_clip's tokenizer for the architecture: list[str] -> (B, context_length) int64."""
    return open_clip.get_tokenizer(cfg.name)


class RewardModel(nn.Module):
    """CLIP as a reward: ``score = cos(text_embedding, image_embedding)``.

    ``forward(tokens (B, L), pos (B, 3, H, W), neg (B, 3, H, W))`` returns the
    L2-normalised text, positive-image and negative-image embeddings, each (B, D).
    Both images go through the image tower in one batch.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(pixels).float(), dim=-1)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor):
        t = self.encode_text(tokens)
        imgs = self.encode_image(torch.cat([pos, neg], dim=0))
        p, n = imgs.split(pos.shape[0], dim=0)
        return t, p, n

    @staticmethod
    def score(text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of normalised embeddings, (B,)."""
        return (text_emb * image_emb).sum(-1)
