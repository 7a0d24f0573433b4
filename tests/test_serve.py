"""The Ray Serve app over real HTTP on loopback: /score equals RewardScorer, /rank orders best first, requests
are batched across clients, and bad input gets a 4xx with its reason while good requests in parallel succeed."""

import base64
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import ROOT, free_port
from PIL import Image

import sr_ray
from sr_ray.reward.score import RewardScorer
from sr_ray.serve import ServeConfig, start


def png(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size + seed % 7, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def call(url: str, body, raw: bool = False) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body if raw else json.dumps(body).encode())  # curl -d's form type
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def served(ray_cluster, checkpoint):
    from ray import serve

    cfg = ServeConfig(checkpoint=checkpoint, port=free_port(), num_cpus=0.25, max_batch_size=16,
                      batch_wait_timeout_s=0.2, max_images_per_request=6)
    cfg.limits.max_image_bytes = 200_000
    url = start(cfg, blocking=False)
    yield url
    serve.shutdown()


def test_score_rank_batching_and_bad_input_over_http(served, checkpoint):
    url = served
    pngs = [png(i) for i in range(5)]
    ref = RewardScorer(checkpoint, device="cpu")
    expected = ref.score("a red cat", pngs)
    status, body = call(f"{url}/score", {"prompt": "a red cat", "images": [b64(p) for p in pngs]})
    assert status == 200 and body["scores"] == pytest.approx(expected, abs=1e-5)
    status, body = call(f"{url}/score", [{"prompt": "a red cat", "images": [b64(pngs[0])]},
                                         {"prompt": "a boat", "images": ["data:image/png;base64," + b64(pngs[1])]}])
    assert status == 200 and body["results"][0]["scores"] == pytest.approx(expected[:1], abs=1e-5)
    assert body["results"][1]["scores"] == pytest.approx(ref.score("a boat", pngs[1:2]), abs=1e-5)
    status, body = call(f"{url}/rank", {"prompt": "a red cat", "images": [b64(p) for p in pngs]})
    assert status == 200 and body["order"] == list(np.argsort(-expected, kind="stable"))

    bad = [(b"{not json", 400, "bad JSON"),
           ({"prompt": "", "images": [b64(pngs[0])]}, 400, "empty prompt"),
           ({"prompt": "x", "images": ["%%%"]}, 400, "neither valid base64"),
           ({"prompt": "x", "images": [b64(b"not an image at all")]}, 400, "undecodable image"),
           ({"prompt": "x", "images": [b64(pngs[0])] * 7}, 413, "max_images_per_request=6"),
           ({"prompt": "x", "images": [b64(png(1, 400))]}, 413, "max_image_bytes"),
           ({"images": [b64(pngs[0])]}, 422, "each item is"),
           ([], 422, "empty list")]
    good = {"prompt": "a red cat", "images": [b64(pngs[2])]}
    with ThreadPoolExecutor(16) as pool:  # bad requests and good ones at the same time, into the same batches
        bad_f = [pool.submit(call, f"{url}/score", b, isinstance(b, bytes)) for b, _, _ in bad]
        good_f = [pool.submit(call, f"{url}/score", good) for _ in range(12)]
        for f, (_, code, reason) in zip(bad_f, bad):
            status, body = f.result()
            assert status == code and reason in json.dumps(body), (status, body)
        for f in good_f:
            status, body = f.result()
            assert status == 200 and body["scores"] == pytest.approx(expected[2:3], abs=1e-5)
    with urllib.request.urlopen(f"{url}/healthz") as r:
        assert json.loads(r.read()) == {"ok": True}  # the replica is still up
    with urllib.request.urlopen(f"{url}/stats") as r:
        stats = json.loads(r.read())
    assert max(int(k) for k in stats["batch_sizes"]) > 1  # concurrent requests' images shared a model call
    assert stats["rejected"] == len(bad)
    with urllib.request.urlopen(f"{url}/openapi.json") as r:
        assert {"/score", "/rank", "/healthz"} <= set(json.loads(r.read())["paths"])
    # the RL reward as a client of the endpoint: the same scores as in-process
    arr = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB").crop((0, 0, 40, 40))) for p in pngs])
    prompts = ["a red cat", "a boat", "a red cat", "a kite", "a red cat"]
    rewards, meta = sr_ray.reward_fn(url, batch_size=2)(arr, prompts, [{}] * 5)
    assert rewards.shape == (5,) and meta["reward_model"] == url
    assert rewards.numpy() == pytest.approx(ref.score(prompts, [Image.fromarray(a) for a in arr]), abs=1e-5)


def test_serve_config_yaml_is_a_valid_serve_deploy_config(checkpoint):
    import yaml
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from sr_ray.core.config import ConfigError
    from sr_ray.serve import app_builder

    d = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(d)  # what `serve deploy` checks
    app = schema.applications[0]
    assert app.import_path == "sr_ray.serve:app_builder"
    args = {**d["applications"][0]["args"], "checkpoint": checkpoint}
    ServeConfig(**{k: v for k, v in args.items() if k != "limits"})  # every arg is a ServeConfig key
    assert isinstance(app_builder(args), Application)
    with pytest.raises(ConfigError, match="checkpoint is required"):
        app_builder({k: v for k, v in args.items() if k != "checkpoint"})
    with pytest.raises(ConfigError, match="nosuchkey"):
        app_builder({**args, "nosuchkey": 1})
