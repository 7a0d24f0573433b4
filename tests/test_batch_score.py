"""Batch scoring of generations: same scores as score(), prompts encoded once, rejects, resume, S3."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sr_ray.batch_score import (GenerationPreprocessor, GenerationScorer, ScoreConfig, inspect_inputs,
                                score_generations)
from sr_ray.data import DataError
from sr_ray.demo import make_generations
from sr_ray.model import ModelConfig, RewardModel, build_clip
from sr_ray.score import RewardScorer, save_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward")
    torch.manual_seed(1)
    cfg = ModelConfig(name="sr-tiny")
    save_model(path, RewardModel(build_clip(cfg)), cfg)
    return str(path)


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
    from sr_ray.batch_score import checkpoint_model_config

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
    assert "image" not in out and "pixels" not in out and "user_id" in out


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
    with pytest.raises(DataError, match="str.parquet column image is string, expected binary"):
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
                      batch_size=8, decode_batch_size=8)
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
