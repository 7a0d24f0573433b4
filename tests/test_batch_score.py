"""Batch scoring of generations: same scores as score(), prompts encoded once, rejects, resume, S3."""


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sr_ray.demo.data import make_generations
from sr_ray.generations.score import (
    GenerationPreprocessor,
    GenerationScorer,
    ScoreConfig,
    ScoringPoolConfig,
    inspect_inputs,
    score_generations,
)
from sr_ray.reward.data import DataError
from sr_ray.reward.score import RewardScorer


def write_generations(folder, prompts=12, per_prompt=3, bad=3, files=3, seed=0):
    cols = make_generations(prompts, per_prompt, 32, seed, bad)
    table = pa.table(cols)
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-len(table) // files)
    for k in range(files):
        pq.write_table(table.slice(k * step, step), folder / f"part-{k}.parquet")
    return cols


def run_stages(checkpoint, cols, batch=8, backend="torch"):
    """The job's two map_batches stages, in this process, over numpy batches of ``cols``."""
    from sr_ray.generations.score import checkpoint_model_config

    prep = GenerationPreprocessor(checkpoint_model_config(checkpoint), None, None)
    scorer = GenerationScorer(checkpoint, backend=backend, device="cpu")
    out = []
    n = len(cols["generation_id"])
    for s in range(0, n, batch):
        b = {k: np.array(v[s:s + batch], dtype=object) for k, v in cols.items()}
        out.append(scorer(prep(b)))
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def test_stages_score_like_the_python_api_and_encode_each_prompt_once(checkpoint):
    cols = make_generations(10, 4, 32, 0, 3)
    out = run_stages(checkpoint, cols)
    ok = out["reason"] == ""
    reasons = sorted(out["reason"][~ok])
    assert ok.sum() == 40 and len(reasons) == 3 and reasons[0] == "empty prompt"
    assert all(r.startswith("undecodable image") for r in reasons[1:]), reasons
    idx = [i for i, good in enumerate(ok) if good]
    want = RewardScorer(checkpoint, device="cpu").score([cols["prompt"][i] for i in idx],
                                                        [cols["image"][i] for i in idx])
    assert np.allclose(out["score"][ok], want, atol=1e-5)
    assert np.isnan(out["score"][~ok]).all()
    # 10 prompts x 4 images over batches of 8: each prompt's text went through the model once
    assert out["texts_encoded"].sum() == len({p for p, g in zip(cols["prompt"], ok) if g}) == 10
    # only what scoring needs goes through Ray: the other input columns are joined back when a shard is written
    assert "image" not in out and "pixels" not in out and "user_id" not in out


def test_uint8_pixels_cross_the_object_store_and_normalize_exactly_on_the_scorer(checkpoint):
    """The decode stage sends (H, W, 3) uint8 (a quarter of float32's bytes); the device half of the
    transform gives the model exactly the tensor the full open_clip transform gives."""
    import torch

    from sr_ray.core import images
    from sr_ray.generations.score import checkpoint_model_config
    from sr_ray.reward.model import ModelConfig, image_transform, normalize_pixels, preprocess_cfg

    mcfg = checkpoint_model_config(checkpoint)
    cols = make_generations(3, 2, 48, 2, 0)
    b = {k: np.array(v, dtype=object) for k, v in cols.items()}
    px = GenerationPreprocessor(mcfg, None, None)(b)["pixels"]
    pcfg = preprocess_cfg(ModelConfig(**mcfg))
    h = w = pcfg["size"] if isinstance(pcfg["size"], int) else pcfg["size"][0]
    assert px.dtype == np.uint8 and px.shape == (6, h, w, 3) and px.nbytes == 6 * 3 * h * w
    full = torch.stack([image_transform(pcfg)(images.decode(x)) for x in cols["image"]])
    assert torch.equal(normalize_pixels(torch.as_tensor(px), pcfg["mean"], pcfg["std"]), full)


def test_deepspeed_backend_runs_on_cpu_and_matches_torch(checkpoint):
    import deepspeed

    cols = make_generations(6, 3, 32, 1, 2)
    ds = run_stages(checkpoint, cols, backend="deepspeed")
    pt = run_stages(checkpoint, cols)
    assert isinstance(GenerationScorer(checkpoint, backend="deepspeed", device="cpu").engine,
                      deepspeed.InferenceEngine)
    ok = pt["reason"] == ""
    assert ok.sum() == 18 and (ds["reason"] == pt["reason"]).all()
    assert np.allclose(ds["score"][ok], pt["score"][ok], atol=1e-5)


def test_bad_inputs_are_named_before_ray(tmp_path):
    pq.write_table(pa.table({"generation_id": ["a"], "prompt": ["p"]}), tmp_path / "no-image.parquet")
    with pytest.raises(DataError, match=r"no-image.parquet lacks column\(s\) \['image or image_uri'\]"):
        inspect_inputs(str(tmp_path), None)
    (tmp_path / "no-image.parquet").unlink()
    pq.write_table(pa.table({"generation_id": ["a"], "prompt": ["p"], "image": ["x"]}), tmp_path / "str.parquet")
    with pytest.raises(DataError, match="str.parquet column 'image' is string, expected binary"):
        inspect_inputs(str(tmp_path), None)
    with pytest.raises(DataError, match="no such file"):
        inspect_inputs(str(tmp_path / "missing"), None)


def read_dir(folder):
    files = sorted(p for p in folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in files]) if files else None


@pytest.mark.extended  # ~1 min; the default suite is near its 15-min budget
def test_job_scores_every_generation_once_with_rejects(ray_cluster, checkpoint, tmp_path):
    cols = write_generations(tmp_path / "gen")
    cfg = ScoreConfig(checkpoint=checkpoint, generations=str(tmp_path / "gen"), out=str(tmp_path / "scores"),
                      compute=ScoringPoolConfig(batch_size=8), decode_batch_size=8)
    summary = score_generations(cfg)
    assert summary["rows"] == 39 and summary["rejected"] == 3 and summary["scored"] == 36
    assert summary["prompts_encoded"] >= 12
    out = read_dir(tmp_path / "scores")
    assert sorted(out["generation_id"].to_pylist()) == sorted(g for g in cols["generation_id"] if "bad" not in g)
    assert out.schema.field("score").type == pa.float32() and "image" not in out.column_names
    assert len(list((tmp_path / "scores").glob("*.parquet"))) == 3  # one shard per input file
    rejects = read_dir(tmp_path / "scores" / "_rejects")
    assert sorted(rejects["generation_id"].to_pylist()) == ["gen-bad-000", "gen-bad-001", "gen-bad-002"]
    assert all(rejects["reason"].to_pylist())
    want = RewardScorer(checkpoint, device="cpu").score(
        [cols["prompt"][cols["generation_id"].index(g)] for g in out["generation_id"].to_pylist()],
        [cols["image"][cols["generation_id"].index(g)] for g in out["generation_id"].to_pylist()])
    assert np.allclose(out["score"].to_numpy(), want, atol=1e-5)

    # a re-run finds every shard finished and scores nothing again
    again = score_generations(cfg)
    assert again["shards_skipped"] == 3 and again["rows"] == 39 and again["prompts_encoded"] == 0


@pytest.mark.extended  # ~1 min
def test_s3_in_and_out_with_bytes_and_uris(ray_cluster, checkpoint, s3_endpoint, s3_bucket):
    """Generations on moto's S3 (one file with image bytes, one with s3:// image_uri), scores written to S3."""
    import boto3
    import pyarrow.fs as pafs

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    cols = make_generations(6, 3, 32, 3, 2)
    n = len(cols["generation_id"])
    half = n // 2
    first = pa.table({k: v[:half] for k, v in cols.items()})
    uris = []
    for g, img in zip(cols["generation_id"][half:], cols["image"][half:]):
        s3.put_object(Bucket=s3_bucket, Key=f"images/{g}.png", Body=img)
        uris.append(f"s3://{s3_bucket}/images/{g}.png")
    second = pa.table({"generation_id": cols["generation_id"][half:], "prompt": cols["prompt"][half:],
                       "image_uri": uris, "user_id": cols["user_id"][half:]})
    for name, t in (("bytes", first), ("uris", second)):
        sink = pa.BufferOutputStream()
        pq.write_table(t, sink)
        s3.put_object(Bucket=s3_bucket, Key=f"generations/{name}.parquet", Body=sink.getvalue().to_pybytes())
    out = f"s3://{s3_bucket}/scores/"
    cfg = ScoreConfig(checkpoint=checkpoint, generations=f"s3://{s3_bucket}/generations/", out=out,
                      s3_endpoint=s3_endpoint, compute=ScoringPoolConfig(batch_size=8), decode_batch_size=8)
    summary = score_generations(cfg)
    assert summary["rows"] == n and summary["rejected"] == 2 and summary["output"] == out

    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", region="us-east-1")
    keys = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/scores", recursive=True)))
    assert keys == [f"{s3_bucket}/scores/{p}" for p in
                    ("_rejects", "_rejects/bytes.parquet", "_rejects/uris.parquet", "_scoring.json", "_shards",
                     "_shards/bytes.parquet.json", "_shards/uris.parquet.json", "_summary.json",
                     "bytes.parquet", "uris.parquet")]
    table = pa.concat_tables([pq.read_table(f"{s3_bucket}/scores/{s}.parquet", filesystem=fs)
                              for s in ("bytes", "uris")], promote_options="permissive")
    got = dict(zip(table["generation_id"].to_pylist(), table["score"].to_pylist()))
    good = [i for i, g in enumerate(cols["generation_id"]) if "bad" not in g]
    want = RewardScorer(checkpoint, device="cpu").score([cols["prompt"][i] for i in good],
                                                        [cols["image"][i] for i in good])
    assert np.allclose([got[cols["generation_id"][i]] for i in good], want, atol=1e-5)
    assert table.column("image_uri").null_count == half  # the bytes file's rows have no URI


@pytest.mark.extended  # ~1.5 min
def test_killed_job_resumes_and_scores_every_generation_exactly_once(ray_cluster, checkpoint, tmp_path):
    """The job SIGKILLs itself right after its first shard commit (``kill_after_shards=1``); the re-run skips that
    shard and scores the rest once. (Killing it from outside when the first shard record appears raced the other
    commits: this job scores its 242 rows in ~0.25 s, and CI once saw all 8 shards committed before the kill.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    cols = write_generations(tmp_path / "gen", prompts=60, per_prompt=4, bad=2, files=8)
    out = tmp_path / "scores"
    over = [f"checkpoint={checkpoint}", f"generations={tmp_path / 'gen'}", f"out={out}", "batch_size=4",
            "decode_batch_size=4", "block_rows=8", "min_actors=1", "max_actors=1", "kill_after_shards=1"]
    proc = subprocess.run([sys.executable, "jobs/score_generations.py", *over,
                           f"ray_address={ray_cluster.get_runtime_context().gcs_address}"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "fault injection: SIGKILL after 1 committed shard(s)" in proc.stderr
    committed = {p.name[:-len(".json")] for p in out.glob("_shards/*.json")}
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.name in committed}
    assert len(done) == 1 and len(committed) == 1, (sorted(committed), sorted(done))
    assert not list(out.glob("_summary.json"))
    time.sleep(2)  # let the cluster reclaim the killed driver's actors

    summary = score_generations(ScoreConfig(checkpoint=checkpoint, generations=str(tmp_path / "gen"), out=str(out),
                                            compute=ScoringPoolConfig(batch_size=8), decode_batch_size=8))
    assert summary["shards_skipped"] == len(done) and summary["shards"] == 8
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.name in done} == done
    ids = read_dir(out)["generation_id"].to_pylist() + read_dir(out / "_rejects")["generation_id"].to_pylist()
    assert sorted(ids) == sorted(cols["generation_id"])  # every generation exactly once, scored or rejected
    assert summary["rows"] == 242 and summary["rejected"] == 2


def test_decode_runs_in_cpu_tasks_when_the_scorers_take_gpus(ray_cluster, checkpoint, tmp_path, capsys):
    """The physical plan: on GPU the decode stage stays apart (CPU tasks); on CPU Ray Data fuses it into the actors."""
    from sr_ray.generations.score import build_pipeline, checkpoint_model_config

    write_generations(tmp_path / "gen", prompts=2, per_prompt=2, bad=0, files=1)
    files = inspect_inputs(str(tmp_path / "gen"), None)
    mcfg = checkpoint_model_config(checkpoint)
    plans = {}
    for gpu in (True, False):
        build_pipeline(ScoreConfig(compute=ScoringPoolConfig(use_gpu=gpu)), files, mcfg, checkpoint).explain()
        out = capsys.readouterr().out
        plans[gpu] = out[out.index("Physical Plan (Optimized)"):]
    assert "ActorPoolMapOperator[MapBatches(GenerationScorer)]" in plans[True]
    assert "TaskPoolMapOperator[MapBatches(GenerationPreprocessor)]" in plans[True]
    assert "ActorPoolMapOperator[MapBatches(GenerationPreprocessor)->MapBatches(GenerationScorer)]" in plans[False]


@pytest.mark.extended
def test_any_scorer_scores_generations_with_its_own_preprocessing(ray_cluster, tmp_path):
    """scorer=<import path>: the same job, decode-only CPU stage, the scorer's actor; rejects counted; a re-run
    with other scorer settings refused, naming them."""
    from PIL import Image

    from sr_ray.core import images
    from sr_ray.core.config import ConfigError

    colours = [(255, 0, 0), (0, 255, 0), (128, 64, 0)]
    cols = {"generation_id": ["r", "g", "o", "bad"], "prompt": ["a", "a", "b", "b"],
            "image": [images.encode_png(Image.new("RGB", (16, 16), c)) for c in colours] + [b"junk"]}
    (tmp_path / "gen").mkdir()
    pq.write_table(pa.table(cols), tmp_path / "gen" / "part-0.parquet")
    base = dict(generations=str(tmp_path / "gen"), out=str(tmp_path / "scores"), compute=ScoringPoolConfig(batch_size=2),
                decode_batch_size=2,
                scorer="plugin_scorers:redness", plugins={"plugin_scorers:redness": {"scale": 2.0}})
    s = score_generations(ScoreConfig(**base))
    assert (s["scored"], s["rejected"], s["scorer"], s["checkpoint"]) == (3, 1, "plugin_scorers:redness", None)
    out = read_dir(tmp_path / "scores").to_pandas().set_index("generation_id")["score"]
    assert out.to_dict() == pytest.approx({"r": 2.0, "g": -2.0, "o": 2 * (128 - 64) / 255})  # 2 (mean R - mean G)
    with pytest.raises(ConfigError, match="settings"):
        score_generations(ScoreConfig(**{**base, "plugins": {"plugin_scorers:redness": {"scale": 3.0}}}))
    with pytest.raises(ValueError, match="only the social_reward scorer"):
        ScoreConfig(scorer="pickscore", backend="deepspeed")
