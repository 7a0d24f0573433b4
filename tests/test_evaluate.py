"""Generation and T2I evaluation: prompt files, fixed seeds, Table 5/6 and best-of-N by hand, the job end to end."""

import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from sr_ray.core.config import ConfigError
from sr_ray.core.prompt_files import read_prompt_file
from sr_ray.demo.prompts import ensure_demo_prompt_files
from sr_ray.diffusion.generate import (
    GenComputeConfig,
    GenerateConfig,
    ImageGenerator,
    SamplingConfig,
    check_models,
    generate,
    image_seed,
    load_prompt_sets,
)
from sr_ray.eval.scorers import BUILTIN, PAPER_METRICS
from sr_ray.eval.scorers.social_reward import SocialRewardConfig
from sr_ray.eval.t2i import (
    EvaluateT2IConfig,
    best_of_n,
    best_of_n_table,
    evaluate_t2i,
    table5,
    table5_markdown,
    win_rates,
)


def rows(model, pset, prompt, scores):
    return [{"generation_id": f"{model}/{pset}/{prompt}/{i}", "model": model, "prompt_set": pset, "prompt": prompt,
             "prompt_index": 0, "image_index": i, "a": a, "b": b} for i, (a, b) in enumerate(scores)]


@pytest.fixture
def hand_scores():
    """Two prompt sets; per prompt 2 images of (metric a, metric b) for baseline and finetuned."""
    r = []
    # set s1, metric a: p1 win on the mean although image 0 loses (0.2 < 0.3): the prompt's mean decides
    r += rows("baseline", "s1", "p1", [(0.3, 0.5), (0.3, 0.5)]) + rows("finetuned", "s1", "p1", [(0.2, 0.4), (0.6, 0.4)])
    # p2: a tie on a (means 0.5 = 0.5), b win
    r += rows("baseline", "s1", "p2", [(0.4, 0.1), (0.6, 0.1)]) + rows("finetuned", "s1", "p2", [(0.5, 0.3), (0.5, 0.3)])
    # p3: a loss on a; image 1 of the fine-tuned model undecodable (NaN): the mean of image 0 alone, 0.9 > 0.8 on b
    r += rows("baseline", "s1", "p3", [(0.7, 0.8), (0.7, 0.8)]) + \
        rows("finetuned", "s1", "p3", [(0.1, 0.9), (float("nan"), float("nan"))])
    # p4: only the baseline has it -> not compared
    r += rows("baseline", "s1", "p4", [(0.0, 0.0), (0.0, 0.0)])
    # set s2: one prompt, fine-tuned wins on a, loses on b
    r += rows("baseline", "s2", "q1", [(0.1, 0.9), (0.1, 0.9)]) + rows("finetuned", "s2", "q1", [(0.2, 0.1), (0.2, 0.1)])
    return pd.DataFrame(r)


def test_table6_win_rate_prompt_by_prompt_on_the_mean_of_its_images(hand_scores):
    t6 = win_rates(hand_scores, "baseline", ["a", "b"]).set_index(["prompt_set", "metric"])
    # s1/a: win, tie, loss over 3 shared prompts -> (1 + 0.5) / 3
    assert t6.loc[("s1", "a"), ["wins", "ties", "losses", "prompts"]].tolist() == [1, 1, 1, 3]
    assert t6.loc[("s1", "a"), "win_rate"] == pytest.approx(0.5)
    # s1/b: p1 loss (0.4 < 0.5), p2 win, p3 win (0.9 > 0.8) -> 2/3
    assert t6.loc[("s1", "b"), "win_rate"] == pytest.approx(2 / 3)
    assert t6.loc[("s2", "a"), "win_rate"] == 1.0 and t6.loc[("s2", "b"), "win_rate"] == 0.0
    assert set(t6["model"]) == {"finetuned"}


def test_table5_means_over_images_leaving_out_bad_ones(hand_scores):
    t5 = table5(hand_scores, ["a", "b"]).set_index(["prompt_set", "model"])
    assert t5.loc[("s1", "finetuned"), "a"] == pytest.approx((0.2 + 0.6 + 0.5 + 0.5 + 0.1) / 5)
    assert t5.loc[("s1", "baseline"), "b"] == pytest.approx((0.5 * 2 + 0.1 * 2 + 0.8 * 2 + 0) / 8)
    assert t5.loc[("s1", "finetuned"), "images"] == 6 and t5.loc[("s1", "baseline"), "prompts"] == 4
    # the interval resamples prompts: s2 has one prompt whose images agree, so its interval is the point
    assert t5.loc[("s2", "baseline"), ["a", "a_ci_low", "a_ci_high"]].tolist() == pytest.approx([0.1, 0.1, 0.1])
    r = t5.loc[("s1", "baseline")]
    assert r["b_ci_low"] < r["b"] < r["b_ci_high"] and r["b_ci_low"] >= 0 and r["b_ci_high"] <= 0.8
    md = table5_markdown(t5.reset_index(), ["a", "b"], 0.95)
    assert "| s2 | baseline | 1 | 2 | 0.1000 [0.1000, 0.1000] | 0.9000 [0.9000, 0.9000] |" in md


def test_best_of_n_keeps_each_prompts_top_image(hand_scores):
    picks = best_of_n(hand_scores, "a").set_index(["model", "prompt_set", "prompt"])
    assert picks.loc[("finetuned", "s1", "p1"), "image_index"] == 1  # 0.6 > 0.2
    assert picks.loc[("finetuned", "s1", "p3"), "image_index"] == 0  # the NaN image never wins
    assert len(picks) == 9  # one per (model, prompt)
    bt = best_of_n_table(hand_scores, best_of_n(hand_scores, "a"), ["a"]).set_index(["prompt_set", "model"])
    assert bt.loc[("s1", "finetuned"), "best_of_n"] == pytest.approx((0.6 + 0.5 + 0.1) / 3)
    assert bt.loc[("s1", "finetuned"), "gain"] == pytest.approx((0.6 + 0.5 + 0.1) / 3 - 1.9 / 5)


def test_prompt_files_of_every_format_and_bad_ones_named(tmp_path):
    (tmp_path / "internal.txt").write_text("# a comment\na red cat\n\n  a blue house  \na red cat\n")
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\nbond\tAbstract\nelement\tAbstract\n")
    pd.DataFrame({"caption": ["x", "y"]}).to_parquet(tmp_path / "caps.parquet")
    sets = load_prompt_sets([str(tmp_path / f) for f in ("internal.txt", "parti.tsv", "caps.parquet")])
    assert sets == {"internal": ["a red cat", "a blue house"], "parti": ["bond", "element"], "caps": ["x", "y"]}
    assert load_prompt_sets([str(tmp_path / "parti.tsv")], max_prompts=1) == {"parti": ["bond"]}
    (tmp_path / "nocol.csv").write_text("id,words\n1,hello\n")
    with pytest.raises(ConfigError, match="nocol.csv has no prompt column"):
        read_prompt_file(str(tmp_path / "nocol.csv"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="empty.txt holds no prompts"):
        load_prompt_sets([str(tmp_path / "empty.txt")])
    with pytest.raises(ConfigError, match="missing.txt does not exist"):
        load_prompt_sets([str(tmp_path / "missing.txt")])
    with pytest.raises(ConfigError, match="no prompt file given"):  # the stage; the job fills in the demo's
        load_prompt_sets([])
    files = ensure_demo_prompt_files(str(tmp_path / "cache"))
    demo = load_prompt_sets(list(files.values()))
    assert set(demo) == {"internal", "general"} and all(len(set(v)) == len(v) == 12 for v in demo.values())
    assert ensure_demo_prompt_files(str(tmp_path / "cache")) == files  # written once


def test_models_and_metrics_checked_before_any_work(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=r"models.finetuned=.*run: no diffusers pipeline"):
        check_models({"baseline": "tiny", "finetuned": str(tmp_path / "run")})
    assert check_models({"b": "tiny", "hub": "stabilityai/stable-diffusion-2-1-base"})["hub"].startswith("stabilityai")
    with pytest.raises(ValueError, match="metrics: unknown scorer 'pickscor'"):
        EvaluateT2IConfig(metrics=["pickscor"])
    with pytest.raises(ValueError, match=r"best_of_n=\['hps'\]: not among metrics"):
        EvaluateT2IConfig(best_of_n=["hps"])
    assert set(BUILTIN) >= set(PAPER_METRICS) and len(PAPER_METRICS) == 6


def test_same_seed_same_image_whatever_the_batch_and_model_order():
    s = {"images_per_prompt": 2, "steps": 3, "seed": 7}
    batch = {"prompt_set": np.array(["s", "s"], dtype=object), "prompt_index": np.array([0, 1]),
             "prompt": np.array(["a red cat", "a blue kite"], dtype=object), "shard": np.array(["x", "x"], dtype=object)}
    g1 = ImageGenerator("baseline", "tiny", s, batch_size=4, device="cpu")
    out = g1(batch)
    assert list(out["generation_id"]) == ["baseline/s/00000/0", "baseline/s/00000/1", "baseline/s/00001/0",
                                          "baseline/s/00001/1"]
    assert out["seed"][0] == image_seed(7, "a red cat", 0) and len(set(out["seed"])) == 4
    assert list(out["negative_prompt"]) == [""] * 4
    g2 = ImageGenerator("baseline", "tiny", s, batch_size=1, device="cpu")
    one = g2({k: v[1:] for k, v in batch.items()})  # the second prompt alone, one image per call
    from sr_ray.core import images
    a = [np.asarray(images.decode(x), dtype=np.int16) for x in out["image"][2:]]
    b = [np.asarray(images.decode(x), dtype=np.int16) for x in one["image"]]
    assert a[0].shape == (32, 32, 3)
    assert max(int(np.abs(x - y).max()) for x, y in zip(a, b)) <= 1  # same noise; batching may move a rounding
    assert not np.array_equal(a[0], a[1])  # image 1 has its own noise
    ft = ImageGenerator("finetuned", "tiny", s, batch_size=4, device="cpu", negative="t@y quality")
    assert ft(batch)["negative_prompt"][0] == "t@y quality"


def test_the_special_token_comes_from_the_models_pipeline(tmp_path):
    """finetune_sd records the fine-tune set's token in the pipeline; generation reads it from there."""
    from sr_ray.core import special_token
    from sr_ray.diffusion.generate import negative_prompts

    pipe = tmp_path / "run" / "pipeline"
    pipe.mkdir(parents=True)
    models = {"baseline": "tiny", "finetuned": str(pipe), "other": str(tmp_path)}
    cfg = GenerateConfig(sampling=SamplingConfig(negative_for=["finetuned", "other"]))
    special_token.write(str(pipe), special_token.PIPELINE_FILE, "zq quality")
    assert negative_prompts(cfg, models) == {"baseline": "", "finetuned": "zq quality", "other": "t@y quality"}
    cfg = GenerateConfig(sampling=SamplingConfig(negative_for=["finetuned"], negative_prompt="t@y quality"))
    with pytest.raises(ConfigError, match=r"sampling.negative_prompt='t@y quality' but models.finetuned .* records "
                                          r"the special token 'zq quality'"):
        negative_prompts(cfg, models)


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    """A 'fine-tuned' model: the tiny SD with other weights, saved as a fine-tuning run's pipeline; a reward ckpt."""
    from sr_ray.diffusion.components import SDModelConfig, load_components, pipeline
    from sr_ray.reward.model import ModelConfig, RewardModel, build_clip
    from sr_ray.reward.score import save_model

    root = tmp_path_factory.mktemp("t2i")
    pipeline(load_components(SDModelConfig(seed=1))).save_pretrained(root / "run" / "pipeline")
    torch.manual_seed(1)
    cfg = ModelConfig(name="sr-tiny")
    save_model(root, RewardModel(build_clip(cfg)), cfg)
    return root


@pytest.mark.extended  # ~70 s: out of the default suite for its 12-minute budget; .ci/run runs it
def test_evaluation_job_tables_grids_best_of_n_and_resume(ray_cluster, sd_dirs, tmp_path):
    (tmp_path / "internal.txt").write_text("a red cat, watercolor\na blue house, photo\na green kite, sticker\n")
    (tmp_path / "general.txt").write_text("a photo of a cat\na photo of a boat\n")
    cfg = EvaluateT2IConfig(
        baseline="tiny", finetuned=str(sd_dirs / "run"), prompts=[str(tmp_path / "internal.txt"),
                                                                  str(tmp_path / "general.txt")],
        sampling=SamplingConfig(images_per_prompt=2, steps=3),
        metrics=["social_reward", "clip", "pickscore"], social_reward=SocialRewardConfig(checkpoint=str(sd_dirs)),
        best_of_n=["pickscore", "social_reward"], n_boot=200,
        grid_prompts=2, out=str(tmp_path / "eval"))
    cfg.generation.batch_size, cfg.generation.prompts_per_shard, cfg.generation.cpus_per_actor = 4, 2, 0.5
    cfg.scoring.cpus_per_actor = 0.5
    s = evaluate_t2i(cfg)
    assert s["images"] == 2 * 5 * 2 and s["bad_images"] == 0
    assert s["generation"]["shards_written"] == 2 * (2 + 1)  # per model: internal 2 shards, general 1
    gen = pq.read_table(tmp_path / "eval" / "generations").to_pandas()
    assert len(gen) == 20 and set(gen["negative_prompt"][gen["model"] == "finetuned"]) == {"t@y quality"}
    assert set(gen["negative_prompt"][gen["model"] == "baseline"]) == {""}
    by = gen.set_index(["model", "prompt", "image_index"])["seed"]
    assert (by.loc["baseline"] == by.loc["finetuned"]).all()  # same noise for both models
    scores = pd.read_parquet(tmp_path / "eval" / "scores.parquet")
    assert scores[["social_reward", "clip", "pickscore"]].notna().all().all()
    from sr_ray.core import images
    from sr_ray.reward.score import RewardScorer
    row = gen.iloc[5]
    want = RewardScorer(str(sd_dirs), device="cpu").score([row["prompt"]], [images.decode(row["image"])])[0]
    assert scores.set_index("generation_id").loc[row["generation_id"], "social_reward"] == pytest.approx(want, abs=1e-5)
    t6 = pd.read_csv(tmp_path / "eval" / "table6.csv")
    assert len(t6) == 2 * 3 and (t6["ci_low"] <= t6["win_rate"]).all() and (t6["win_rate"] <= t6["ci_high"]).all()
    assert (t6["prompts"] == t6["prompt_set"].map({"internal": 3, "general": 2})).all()
    assert t6.set_index(["prompt_set", "metric"])["win_rate"].to_dict() == pytest.approx(
        win_rates(scores, "baseline", ["social_reward", "clip", "pickscore"], n_boot=200).set_index(["prompt_set", "metric"])["win_rate"]
        .to_dict())
    t5 = pd.read_csv(tmp_path / "eval" / "table5.csv")
    assert len(t5) == 4 and math.isclose(t5["social_reward"].iloc[0], scores[
        (scores.prompt_set == t5.prompt_set.iloc[0]) & (scores.model == t5.model.iloc[0])]["social_reward"].mean(),
        abs_tol=1e-6)
    from PIL import Image
    grid = Image.open(tmp_path / "eval" / "grid-internal.png")
    assert grid.size == (4 * 128 + 6, 16 + 2 * (16 + 128))  # 2 models x 2 images, 2 prompts
    picks = pd.read_parquet(tmp_path / "eval" / "best_of_n.parquet")
    assert len(picks) == 2 * 10 and picks["image"].notna().all()
    for by in ("pickscore", "social_reward"):  # best-of-N by each scorer: its own maximum per (model, prompt)
        mine = picks[picks["picked_by"] == by]
        assert (mine.groupby(["model", "prompt"])[by].max().values ==
                scores.groupby(["model", "prompt"])[by].max().values).all()
    fig1 = Image.open(tmp_path / "eval" / "best_of_n.png")  # paper Fig. 1: 2 sets x 2 prompts, a column per scorer
    assert fig1.size == (2 * 128 + 6, 16 + 4 * (16 + 128))
    assert "Table 6" in (tmp_path / "eval" / "report.md").read_text()
    # a re-run generates nothing (all shards there) and gives the same tables
    before = (tmp_path / "eval" / "table6.csv").read_text()
    s2 = evaluate_t2i(cfg)
    assert s2["generation"]["shards_written"] == 0 and s2["generation"]["shards_skipped"] == 6
    assert (tmp_path / "eval" / "table6.csv").read_text() == before
    # other sampling settings into the same folder are refused, naming what differs
    other = EvaluateT2IConfig(**{**cfg.__dict__, "sampling": SamplingConfig(images_per_prompt=2, steps=4)})
    with pytest.raises(ConfigError, match="other settings.*steps"):
        evaluate_t2i(other)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["images"] == 20


def test_generation_job_alone_writes_the_generations_contract_and_notices_retrained_weights(ray_cluster, tmp_path):
    from sr_ray.diffusion.components import SDModelConfig, load_components, pipeline

    (tmp_path / "p.txt").write_text("a red cat\n")
    pipeline(load_components(SDModelConfig(seed=2))).save_pretrained(tmp_path / "ft" / "pipeline")
    cfg = GenerateConfig(models={"baseline": "tiny", "ft": str(tmp_path / "ft")}, prompts=[str(tmp_path / "p.txt")],
                         sampling=SamplingConfig(images_per_prompt=3, steps=2, negative_for=["ft"]),
                         out=str(tmp_path / "gen"), compute=GenComputeConfig(cpus_per_actor=0.5))
    s = generate(cfg)
    assert s["images"] == 6 and s["shards_written"] == 2
    t = pq.read_table(tmp_path / "gen" / "baseline" / "p-00000.parquet")
    assert {"generation_id", "prompt", "image"} <= set(t.column_names)  # what score_generations reads
    assert t["generation_id"].to_pylist() == ["baseline/p/00000/0", "baseline/p/00000/1", "baseline/p/00000/2"]
    assert pq.read_table(tmp_path / "gen" / "ft")["negative_prompt"].to_pylist() == ["t@y quality"] * 3
    assert generate(cfg)["shards_written"] == 0
    # the run dir re-trained (new weights, same path): its old images must not pass for the new model's
    pipeline(load_components(SDModelConfig(seed=3))).save_pretrained(tmp_path / "ft" / "pipeline")
    with pytest.raises(ConfigError, match="models.ft were generated from weights that have changed"):
        generate(cfg)


def test_a_fine_tuning_runs_held_out_prompts_are_the_internal_set(tmp_path, monkeypatch):
    from sr_ray.app import defaults
    from sr_ray.eval.t2i import prompt_sets

    monkeypatch.setattr(defaults, "ensure_demo_prompt_files", lambda: ensure_demo_prompt_files(str(tmp_path / "c")))
    job = lambda **kw: defaults.evaluation_inputs(EvaluateT2IConfig(metrics=["clip"], **kw))  # noqa: E731

    (tmp_path / "ftset").mkdir()
    (tmp_path / "ftset" / "internal.jsonl").write_text('{"prompt": "held one"}\n{"prompt": "held two"}\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(f"data:\n  train: {tmp_path / 'ftset'}\n")
    (tmp_path / "parti.txt").write_text("a bond\n")
    files, sets = prompt_sets(job(finetuned=str(tmp_path / "run")))  # the job adds the demo's general set
    assert sets["internal"] == ["held one", "held two"] and len(sets["general"]) == 12
    _, sets = prompt_sets(EvaluateT2IConfig(finetuned=str(tmp_path / "run")))  # the stage: what it is given
    assert sets == {"internal": ["held one", "held two"]}
    files, sets = prompt_sets(EvaluateT2IConfig(finetuned=str(tmp_path / "run"), prompts=[str(tmp_path / "parti.txt")]))
    assert files[0].endswith("internal.jsonl") and sets == {"internal": ["held one", "held two"], "parti": ["a bond"]}
    (tmp_path / "internal.txt").write_text("mine\n")  # an internal set given wins
    _, sets = prompt_sets(EvaluateT2IConfig(finetuned=str(tmp_path / "run"), prompts=[str(tmp_path / "internal.txt")]))
    assert sets == {"internal": ["mine"]}
    _, sets = prompt_sets(job(finetuned="stabilityai/stable-diffusion-2-1-base"))  # no run record: both demo sets
    assert set(sets) == {"internal", "general"} and "held one" not in sets["internal"]
