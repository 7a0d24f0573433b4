"""``pickscore``: PickScore_v1 (Kirstain et al., 2023), a transformers ``CLIPModel`` (ViT-H/14) fine-tuned on
Pick-a-Pic, with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.

Score, as PickScore's own inference code: ``logit_scale.exp() * cos(text_embedding, image_embedding)``
(a softmax over a prompt's images turns it into the probability each is picked). Images go through the
PIL CLIP image processor (shortest side to 224, bicubic; centre crop; CLIP mean/std), prompts through the
CLIP tokenizer padded to the batch's longest, truncated at 77 tokens.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sr_ray.eval.scorers.base import autocast, device_of, fetch_weights, in_batches, random_weights_warning, rgb, seeded

PAPER_MODEL = "yuvalkirstain/PickScore_v1"
PAPER_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class PickScoreConfig:
    model: str | None = None
    """A transformers CLIPModel folder, s3:// folder or hub id (yuvalkirstain/PickScore_v1); none: a small
    random CLIPModel (demo only)."""
    processor: str | None = None
    """Its processor (folder or hub id); none: laion/CLIP-ViT-H-14-laion2B-s32B-b79K with a model, a small one
    built in code without."""
    random_size: str = "small"
    """Without ``model``: small (demo, tests) or full (PickScore_v1's ViT-H/14 shape, random: benchmarks)."""

    def __post_init__(self) -> None:
        if self.random_size not in ("small", "full"):
            raise ValueError(f"pickscore.random_size={self.random_size!r}: small or full")


def tiny_clip_config(image_size: int = 32, full: bool = False):
    """A small CLIPModel config (2 layers, width 32) with the real CLIP vocabulary; ``full``: PickScore_v1's
    shape (ViT-H/14: vision 1280 x 32 layers, text 1024 x 24, projection 1024) at 224 px."""
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                hidden_act="gelu")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8, hidden_act="gelu")
    if full:
        text.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        vision.update(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      image_size=224, patch_size=14)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024 if full else 16)


def clip_tokenizer_files(folder: str | Path) -> Path:
    """``vocab.json`` + ``merges.txt`` of the CLIP BPE tokenizer, made from the vocabulary open_clip ships
    (the same vocabulary as OpenAI's and LAION's CLIP tokenizers), so no download is needed."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>",
                                                                                  "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def tiny_processor_dir(folder: str | Path, image_size: int = 32) -> Path:
    """A saved processor (CLIP tokenizer + PIL image processor at ``image_size``), loadable like a hub one."""
    from transformers import CLIPImageProcessorPil, CLIPTokenizer

    folder = clip_tokenizer_files(folder)
    CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt")).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                          image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(folder)
    return folder


def features(out) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


class PickScore:
    name = "pickscore"

    def __init__(self, cfg: PickScoreConfig, device: str | None = None, batch_size: int = 32, bf16: bool = True):
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        self.device, self.bf16, self.batch_size = device_of(device), bf16, batch_size
        if cfg.model is None:
            random_weights_warning(self.name)
            full = cfg.random_size == "full"
            with seeded(0):
                self.model = CLIPModel(tiny_clip_config(full=full))
            processor = cfg.processor or str(tiny_processor_dir(tempfile.mkdtemp(prefix="sr-ray-pick-"),
                                                                224 if full else 32))
        else:
            self.model = CLIPModel.from_pretrained(fetch_weights(cfg.model, "pickscore.model"))
            processor = cfg.processor or PAPER_PROCESSOR
        processor = fetch_weights(processor, "pickscore.processor")
        self.model.eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(processor)
        self.images = CLIPImageProcessorPil.from_pretrained(processor)  # the PIL path PickScore was run with

    @torch.no_grad()
    def _batch(self, prompts: list[str], images: list) -> torch.Tensor:
        uniq = sorted(set(prompts))  # each distinct prompt encoded once
        text = self.tokenizer(uniq, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        pix = self.images(images=rgb(images), return_tensors="pt")["pixel_values"].to(self.device)
        with autocast(self.device, self.bf16):
            t = features(self.model.get_text_features(**text)).float()
            im = features(self.model.get_image_features(pixel_values=pix)).float()
        t = t / t.norm(dim=-1, keepdim=True)
        im = im / im.norm(dim=-1, keepdim=True)
        idx = torch.tensor([uniq.index(p) for p in prompts], device=self.device)
        return (self.model.logit_scale.exp().float() * (t[idx] * im).sum(-1)).cpu()

    def score(self, prompts: Sequence[str], images: Sequence) -> np.ndarray:
        return in_batches(self._batch, prompts, images, self.batch_size)


def build(cfg: PickScoreConfig, device: str | None = None, batch_size: int = 32, bf16: bool = True):
    return PickScore(cfg, device, batch_size, bf16)
