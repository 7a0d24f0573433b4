"""What every scorer shares: the interface, the device and precision, and where weights come from.

A scorer scores (prompt, image) pairs: ``score(prompts, images) -> (N,) float`` (one prompt per image, PIL
images, higher = preferred), with its own preprocessing. It is built once per process (per Ray actor) and
runs on the GPU in bf16 when there is one, else fp32 on the CPU.

Weights are named by a string: a local file or folder, an ``s3://`` URI (copied to local disk once per
process), an ``https://`` URL, or a Hugging Face hub id (``org/name`` for a repository, ``org/name/file.pt``
for one file in it) for users who have the network. ``None`` means random, seeded weights of a small variant
of the architecture: the demo and the tests, never a real comparison (logged as a warning).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from sr_ray.core import storage
from sr_ray.core.errors import ConfigError

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("SR_RAY_CACHE", "~/.cache/sr-ray")).expanduser()


class Scorer(Protocol):
    name: str

    def score(self, prompts: Sequence[str], images: Sequence) -> np.ndarray: ...


def device_of(device: str | None) -> torch.device:
    """The scorer's device: as given, else CUDA when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast(device: torch.device, bf16: bool = True):
    """bf16 autocast on CUDA (``bf16``), plain fp32 elsewhere."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rgb(images: Sequence) -> list:
    """PIL RGB images from PIL images or HxWx3 uint8 arrays (what Ray Data hands an actor)."""
    from PIL import Image

    out = []
    for x in images:
        if isinstance(x, Image.Image):
            out.append(x.convert("RGB"))
        else:
            out.append(Image.fromarray(np.asarray(x, dtype=np.uint8)).convert("RGB"))
    return out


def check_batch(prompts: Sequence[str], images: Sequence) -> None:
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")


def in_batches(batch_fn, prompts: Sequence[str], images: Sequence, batch_size: int) -> np.ndarray:
    """``batch_fn(prompts, images) -> (n,) tensor`` over slices of ``batch_size``; (N,) float32 numpy."""
    check_batch(prompts, images)
    out = [batch_fn(list(prompts[s:s + batch_size]), list(images[s:s + batch_size]))
           for s in range(0, len(images), batch_size)]
    return torch.cat(out).float().numpy() if out else np.zeros(0, np.float32)


def seeded(seed: int = 0):
    """Random-weight small models: the same weights in every process (fork of the global RNG)."""
    @contextlib.contextmanager
    def ctx():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            yield
    return ctx()


def _is_hub_id(uri: str) -> bool:
    parts = uri.split("/")
    return len(parts) >= 2 and not uri.startswith((".", "/", "~")) and all(parts) and ":" not in uri


def fetch_weights(uri: str | None, key: str, endpoint: str | None = None) -> str | None:
    """A local path (file or folder) for the weights named ``uri``; ``key`` names the config key in errors.

    Local paths are used in place; ``s3://`` and URLs are copied once into the cache; hub ids go through
    ``huggingface_hub`` (its own cache). A name that is none of these is a ConfigError naming ``key``.
    """
    if uri is None:
        return None
    if storage.is_s3(uri):
        return _cached_s3(uri, key, endpoint)
    if uri.startswith(("https://", "http://")):
        dest = CACHE / "weights" / hashlib.sha256(uri.encode()).hexdigest()[:16] / Path(uri.split("?")[0]).name
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(uri, str(dest) + ".part", progress=False)
            os.replace(str(dest) + ".part", dest)
        return str(dest)
    local = Path(uri).expanduser()
    if local.exists():
        return str(local.resolve())
    if _is_hub_id(uri):
        return _hub(uri, key)
    raise ConfigError(f"{key}={uri!r}: no such file or folder (nor an s3:// URI, URL or hub id)")


def _cached_s3(uri: str, key: str, endpoint: str | None) -> str:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri, endpoint)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{key}={storage.redact(uri)}: not found")
    tag = f"{uri}|{info.size}|{info.mtime_ns}".encode()
    dest = CACHE / "weights" / hashlib.sha256(tag).hexdigest()[:16] / Path(path).name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(dest) + ".part")
        if info.type == pafs.FileType.Directory:
            pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            with fs.open_input_stream(path) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 24):
                    out.write(chunk)
        os.replace(tmp, dest)
    return str(dest)


def _hub(uri: str, key: str) -> str:
    """``org/name`` -> the repository snapshot folder; ``org/name/path/file`` -> that file."""
    try:
        import huggingface_hub as hf
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        raise ConfigError(f"{key}={uri!r}: a hub id needs huggingface_hub") from None
    parts = uri.split("/")
    try:
        if len(parts) == 2:
            return hf.snapshot_download(uri)
        return hf.hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: all end the same way
        raise ConfigError(f"{key}={uri!r}: not a local path and the hub could not serve it "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_state(path: str, key: str) -> dict:
    """A state dict from a ``.pt``/``.pth``/``.bin`` (``weights_only``: tensors and plain values only, never an
    arbitrary pickle) or ``.safetensors`` file; a ConfigError naming ``key`` and the file otherwise."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign pickle, a text file, a truncated download
        raise ConfigError(f"{key}: {path} is not a weights file sr-ray can read safely "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def random_weights_warning(name: str) -> None:
    log.warning("[%s] random weights (no weights given): demo, tests and benchmarks only, not the published model",
                name)
