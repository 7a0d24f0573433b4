"""The reward model online: a Ray Serve application with dynamic batching across requests.

    sr-ray serve checkpoint=runs/sr-reward-demo [port=8000 max_batch_size=32 batch_wait_timeout_s=0.01 ...]
    serve deploy sr_ray/configs/serve/serve_config.yaml        # the same app from a Serve config (KubeRay RayService)

Routes (OpenAPI docs at ``/docs``, schema at ``/openapi.json``):

- ``POST /score``: ``{"prompt": "...", "images": [base64 or URL, ...]}`` or a list of such items ->
  ``{"scores": [...]}`` (a list of those for a list);
- ``POST /rank``: one prompt, N images -> ``{"order": [indices best first], "scores": [...]}`` (best-of-N);
- ``GET /healthz``; ``GET /stats``: requests, images and the batch sizes formed so far.

Every image of every request waiting in a replica joins one batch (``@serve.batch``: up to ``max_batch_size``
images, waiting at most ``batch_wait_timeout_s``); each distinct prompt of a batch is encoded once, and recent
prompts' embeddings are kept (``prompt_cache``). Bad input is a 4xx with the reason, checked before it joins a
batch (bad JSON 400, a wrong shape 422; empty prompt, undecodable image, too many images 400; too large 413), so one
request never fails another's batch nor the replica.

(No ``from __future__ import annotations`` here: FastAPI reads the route signatures' types in the Serve proxy,
where string annotations of a class made inside a function cannot be resolved.)
"""

import asyncio
import base64
import binascii
import json
import sys
import urllib.request
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sr_ray.core import images
from sr_ray.core.config import ConfigError, from_dict
from sr_ray.core.limits import InputLimits, prompt_problem
from sr_ray.core.ray_utils import init_ray


@dataclass
class ServeConfig:
    checkpoint: str | None = None
    """A run, a checkpoint or an exported folder (local, s3://, hf-hub:org/name)."""
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    max_batch_size: int = 32
    """Images per model call, gathered across requests."""
    batch_wait_timeout_s: float = 0.01
    """How long a batch waits to fill."""
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    """Autoscaling target per replica (used when max_replicas > min_replicas)."""
    num_cpus: float = 1.0
    use_gpu: bool = False
    """A GPU per replica, bf16."""
    max_images_per_request: int = 64
    max_request_bytes: int = 64_000_000
    allow_urls: bool = True
    """Accept http(s) image URLs (fetched by the replica, url_timeout_s, limits.max_image_bytes)."""
    url_timeout_s: float = 10.0
    prompt_cache: int = 4096
    """Prompt embeddings kept per replica (least recently used dropped)."""
    limits: InputLimits = field(default_factory=lambda: InputLimits(max_prompt_chars=2000,
                                                                   max_image_bytes=20_000_000))

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_images_per_request < 1 or self.min_replicas < 1:
            raise ValueError("max_batch_size, max_images_per_request and min_replicas must be >= 1")
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")


ITEM_SCHEMA = {"type": "object", "required": ["prompt", "images"],
               "properties": {"prompt": {"type": "string"},
                              "images": {"type": "array", "items": {"type": "string"},
                                         "description": "base64 (or a data: URL) or an http(s) URL per image"}}}
REQUEST_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "oneOf": [ITEM_SCHEMA, {"type": "array", "items": ITEM_SCHEMA}]},
    "example": {"prompt": "a red cat", "images": ["<base64 PNG>"]}}}}}
"""The request body as the OpenAPI docs show it. The body is parsed by the handler itself, whatever its
Content-Type (``curl -d`` sends a form type), so a bad one gets this app's own 4xx and reason."""


class BadRequest(ValueError):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def image_bytes(ref: str, cfg: ServeConfig) -> bytes:
    """The bytes of one image reference: base64 (optionally a ``data:`` URL) or an http(s) URL."""
    if not isinstance(ref, str) or not ref:
        raise BadRequest(400, "an image must be a non-empty base64 string or URL")
    if ref.startswith(("http://", "https://")):
        if not cfg.allow_urls:
            raise BadRequest(400, "image URLs are off on this server (allow_urls=false): send base64")
        try:
            with urllib.request.urlopen(ref, timeout=cfg.url_timeout_s) as r:
                data = r.read(cfg.limits.max_image_bytes + 1)
        except Exception as e:  # noqa: BLE001 - any fetch failure is the client's URL
            raise BadRequest(400, f"cannot fetch {ref[:200]}: {type(e).__name__}: {e}") from None
    else:
        payload = ref.split(",", 1)[1] if ref.startswith("data:") else ref
        if len(payload) * 3 // 4 > cfg.limits.max_image_bytes + 3:
            raise BadRequest(413, f"image exceeds limits.max_image_bytes={cfg.limits.max_image_bytes}")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(400, "image is neither valid base64 nor an http(s) URL") from None
    if len(data) > cfg.limits.max_image_bytes:
        raise BadRequest(413, f"image of {len(data)} bytes exceeds limits.max_image_bytes={cfg.limits.max_image_bytes}")
    return data


def check_item(item: Any, cfg: ServeConfig) -> tuple[str, list[str]]:
    """(prompt, image references) of one request item, or BadRequest with the reason."""
    if not isinstance(item, dict) or "prompt" not in item or "images" not in item:
        raise BadRequest(422, 'each item is {"prompt": "...", "images": ["<base64 or URL>", ...]}')
    prompt, refs = item["prompt"], item["images"]
    problem = prompt_problem(prompt, cfg.limits)
    if problem:
        raise BadRequest(400, problem)
    if not isinstance(refs, list) or not refs:
        raise BadRequest(422, "images: a non-empty list of base64 strings or URLs")
    if len(refs) > cfg.max_images_per_request:
        raise BadRequest(413, f"{len(refs)} images exceed max_images_per_request={cfg.max_images_per_request}")
    return prompt, refs


class PromptCache:
    """Prompt -> normalised text embedding, least recently used dropped past ``size``."""

    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict()

    def embed(self, model, tokenizer, prompts: list[str], device):
        import torch

        missing = sorted({p for p in prompts if p not in self.items})
        if missing:
            with torch.no_grad():
                emb = model.encode_text(tokenizer(missing).to(device)).float()
            for p, e in zip(missing, emb):
                self.items[p] = e
        for p in prompts:
            self.items.move_to_end(p)
        out = torch.stack([self.items[p] for p in prompts])
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return out


class RewardReplica:
    """One replica's model and its batch (the body of the Serve deployment; also usable without Serve)."""

    def __init__(self, cfg: ServeConfig):
        import torch

        from sr_ray.reward.score import RewardScorer

        self.cfg = cfg
        device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
        self.scorer = RewardScorer(cfg.checkpoint, device=device, batch_size=cfg.max_batch_size)
        self.cache = PromptCache(cfg.prompt_cache)
        self.stats = {"requests": 0, "images": 0, "batches": 0, "batch_sizes": {}, "rejected": 0}

    def score_batch(self, items: list[tuple[str, Any]]) -> list[float]:
        """Scores of (prompt, PIL image) pairs in one model call; each distinct prompt encoded once (cached)."""
        import torch

        from sr_ray.reward.score import RewardModel, inference_autocast

        s = self.scorer
        with torch.no_grad(), inference_autocast(s.device):
            t = self.cache.embed(s.model, s.tokenizer, [p for p, _ in items], s.device)
            pix = torch.stack([s.transform(img) for _, img in items]).to(s.device)
            im = s.model.encode_image(pix)
        n = len(items)
        self.stats["batches"] += 1
        self.stats["batch_sizes"][n] = self.stats["batch_sizes"].get(n, 0) + 1
        return RewardModel.score(t, im).float().cpu().tolist()  # both already normalised by the model

    def decode(self, refs: list[str]) -> list:
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(images.decode(image_bytes(ref, self.cfg), self.cfg.limits))
            except images.BadImage as e:
                status = 413 if "exceeds" in str(e) else 400
                raise BadRequest(status, f"images[{i}]: {e}") from None
            except BadRequest as e:
                raise BadRequest(e.status, f"images[{i}]: {e}") from None
        return out


def build_app(cfg: ServeConfig):
    """The Serve application (a FastAPI ingress deployment) for ``cfg``."""
    from ray import serve

    api = FastAPI(title="sr-ray reward", description="Social Reward scores over HTTP, batched across requests.")
    autoscaling = ({"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                    "target_ongoing_requests": cfg.target_ongoing_requests}
                   if cfg.max_replicas > cfg.min_replicas else None)
    options = {"num_cpus": cfg.num_cpus, **({"num_gpus": 1} if cfg.use_gpu else {})}

    @serve.deployment(name="reward", ray_actor_options=options, autoscaling_config=autoscaling,
                      num_replicas=None if autoscaling else cfg.min_replicas,
                      max_ongoing_requests=max(64, 4 * cfg.max_batch_size))
    @serve.ingress(api)
    class RewardDeployment:
        def __init__(self, cfg_dict: dict):
            self.replica = RewardReplica(from_dict(ServeConfig, cfg_dict))
            self.batch.set_max_batch_size(cfg_dict["max_batch_size"])
            self.batch.set_batch_wait_timeout_s(cfg_dict["batch_wait_timeout_s"])

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def batch(self, items: list[tuple[str, Any]]) -> list[float]:
            return self.replica.score_batch(items)

        async def parse(self, request: Request) -> Any:
            body = await request.body()
            if len(body) > self.replica.cfg.max_request_bytes:
                raise BadRequest(413, f"request of {len(body)} bytes exceeds max_request_bytes")
            try:
                return json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadRequest(400, f"bad JSON: {e}") from None

        async def scores(self, item: Any) -> list[float]:
            prompt, refs = check_item(item, self.replica.cfg)
            imgs = self.replica.decode(refs)
            self.replica.stats["images"] += len(imgs)
            return list(await asyncio.gather(*[self.batch((prompt, im)) for im in imgs]))

        async def answer(self, request: Request, rank: bool) -> JSONResponse:
            self.replica.stats["requests"] += 1
            try:
                body = await self.parse(request)
                if rank:
                    s = await self.scores(body)
                    return JSONResponse({"order": sorted(range(len(s)), key=lambda i: -s[i]), "scores": s})
                if isinstance(body, list):
                    if not body:
                        raise BadRequest(422, "an empty list of items")
                    return JSONResponse({"results": [{"scores": s} for s in
                                                     await asyncio.gather(*[self.scores(b) for b in body])]})
                return JSONResponse({"scores": await self.scores(body)})
            except BadRequest as e:
                self.replica.stats["rejected"] += 1
                return JSONResponse({"error": str(e)}, status_code=e.status)

        @api.post("/score", summary="Scores of images for a prompt (or of a list of such items)",
                  openapi_extra=REQUEST_DOC)
        async def score(self, request: Request):
            return await self.answer(request, rank=False)

        @api.post("/rank", summary="N images of one prompt, best first (best-of-N)", openapi_extra=REQUEST_DOC)
        async def rank(self, request: Request):
            return await self.answer(request, rank=True)

        @api.get("/healthz")
        async def healthz(self) -> dict:
            return {"ok": True}

        @api.get("/stats")
        async def stats(self) -> dict:
            return self.replica.stats

    return RewardDeployment.bind(asdict(cfg))


def app_builder(args: dict):
    """``serve deploy`` / ``serve run sr_ray.serve:app_builder checkpoint=...``: the app from a config's args."""
    cfg = from_dict(ServeConfig, args)
    if not cfg.checkpoint:
        raise ConfigError("checkpoint is required (a run, a checkpoint or an exported folder)")
    return build_app(cfg)


def start(cfg: ServeConfig, blocking: bool = True) -> str:
    """Start the app on the connected (or a new local) Ray cluster at ``host:port``; returns its URL."""
    from ray import serve

    if not cfg.checkpoint:
        raise ConfigError("checkpoint is required: sr-ray serve checkpoint=<run, checkpoint or exported folder>")
    from sr_ray.reward.score import exported_folder, read_checkpoint, run_checkpoint

    ckpt = run_checkpoint(cfg.checkpoint)  # a bad checkpoint is named here, not in a replica that restarts for
    if exported_folder(ckpt) is None:      # ever; read memory-mapped: the weights load in the replicas only
        read_checkpoint(ckpt, mmap=True)
    init_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="sr-reward", route_prefix=cfg.route_prefix, blocking=blocking)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def serve_job(cfg: ServeConfig) -> dict:
    """``sr-ray serve``: start the app and keep it up until Ctrl-C or SIGTERM (what a process manager sends; a
    background process started by a script has SIGINT ignored); the summary when it stops."""
    import signal
    import time

    from ray import serve

    def stop(signum, frame):
        raise KeyboardInterrupt

    url = start(cfg, blocking=False)
    signal.signal(signal.SIGTERM, stop)  # after Ray's start, which installs its own
    signal.signal(signal.SIGINT, stop)
    print(f"sr-ray serve: {url}  (POST /score, POST /rank, GET /healthz, docs at {url}/docs; Ctrl-C stops)",
          file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return {"url": url, "served_s": round(time.time() - t0, 1)}
