"""The training benchmark runs and compares like with like (memory-fed, so it needs no Ray)."""

import pytest

from jobs.benchmark_train import main


def test_benchmark_compares_no_op_freezing_with_explicit_freezing(tmp_path, capsys):
    r = main(["model.name=sr-tiny", "model.unfreeze_vision_blocks=1", "model.unfreeze_text_blocks=0",
              "data_source=memory", "rows=96", "batch_size=16", "steps=3", "warmup_steps=1",
              f"cache_dir={tmp_path}"])
    # the authors' freezing leaves every parameter computing a gradient; ours only the unfrozen ones
    assert r["authors_params_with_grad"] == r["total_params"] > r["trainable_params"] > 0
    assert r["authors_triplets_per_s"] > 0 and r["ours_triplets_per_s"] > 0
    assert abs(r["speedup"] - r["ours_triplets_per_s"] / r["authors_triplets_per_s"]) < 0.01
    assert "speedup sr-ray / authors" in capsys.readouterr().out
    # the cached side trains the same head on the trunk's output: block 1 of sr-tiny's 2 (text: the whole trunk)
    assert r["cache_image_depth"] == 1 and r["cache_text_depth"] == 2
    assert r["cached_triplets_per_s"] > 0 and r["cache_build_triplets_per_s"] > 0
    assert abs(r["cached_speedup"] - r["cached_triplets_per_s"] / r["ours_triplets_per_s"]) < 0.01


def test_scoring_benchmark_times_both_sides_on_the_same_images(ray_cluster, tmp_path, capsys):
    from jobs.benchmark_score import main as bench_score

    r = bench_score(["model.name=sr-tiny", "prompts=4", "images_per_prompt=3", "actors=[1]", "batch_size=8",
                     f"cache_dir={tmp_path}", f"out={tmp_path / 'out'}"])
    run = r["ours"][0]
    assert r["images"] == 12 and r["authors"]["texts_encoded"] == 12  # the reference encodes a text per image
    assert run["texts_encoded"] == r["distinct_prompts"] <= 4  # ours once per prompt
    assert run["max_abs_score_diff"] < 1e-5  # the same scores
    assert abs(run["ratio_vs_authors"] - run["images_per_s"] / r["authors"]["images_per_s"]) < 0.01
    assert (tmp_path / "out" / "results.md").exists() and "sr-ray torch, 1 actor(s)" in capsys.readouterr().out
    # the ceiling is the model alone; the bytes are the decode stage's real output (sr-tiny: 3 x 32 x 32 pixels)
    assert r["ceiling"]["steady_images_per_s"] > 0
    assert abs(run["share_of_ceiling"] - run["steady_images_per_s"] / r["ceiling"]["steady_images_per_s"]) < 0.01
    assert r["object_store_bytes_per_image"] == {"float32": 4 * 3 * 32 * 32, "uint8": 3 * 32 * 32, "ratio": 4.0}


def test_finetune_variants_are_known():
    from sr_ray.bench.finetune import VARIANTS, BenchFinetuneConfig

    assert {"ddp", "zero2", "zero2+latents"} <= set(VARIANTS)
    with pytest.raises(ValueError, match="variants"):
        BenchFinetuneConfig(variants=["zero9"])


@pytest.mark.extended
def test_gpu_report_runs_tiny_on_cpu_with_every_section(ray_cluster, tmp_path):
    """The one GPU command, at size=tiny on this CPU: every section measured, shares of a measured peak, the
    Markdown report written (so the command is known to work before a GPU is there)."""
    from jobs.benchmark_gpu import main

    r = main(["size=tiny", f"out={tmp_path / 'gpu'}"])
    assert r["size"] == "tiny" and r["peak_source"] == "measured fp32 matmul" and r["peak_tflops"] > 0
    s = r["sections"]
    assert not any("error" in x for x in s.values()), s
    score = {x["name"]: x for x in s["score"]["rows"]}
    assert {"authors' loop", "model alone (ceiling)", "sr-ray torch", "sr-ray deepspeed"} <= set(score)
    train = {x["name"]: x for x in s["train"]["rows"]}
    assert train["sr-ray + feature cache"]["gflops_per_triplet"] < train["sr-ray (freeze, Ray Data)"][
        "gflops_per_triplet"] < train["authors' step (no-op freeze, DataLoader)"]["gflops_per_triplet"]
    assert [x["name"] for x in s["finetune"]["rows"]] == ["ddp", "zero2", "zero2+latents"]
    for x in [*s["score"]["rows"], *s["train"]["rows"], *s["finetune"]["rows"]]:
        assert 0 < x["share_of_peak"] < 1, x
    md = (tmp_path / "gpu" / "report.md").read_text()
    assert all(h in md for h in ("## Scoring", "## Reward training", "## SD fine-tuning", "share of peak"))
    assert "Failed" not in md


def test_gpu_report_names_a_failed_section_and_keeps_the_others():
    from sr_ray.bench.gpu import report_markdown

    r = {"size": "full", "device": "NVIDIA H100", "peak_tflops": 989.0, "peak_source": "H100 dense bf16 spec",
         "date": "d", "wall_s": 60.0, "sections": {
             "score": {"error": "RuntimeError: CUDA out of memory"},
             "finetune": {"model": "sd21-base-random", "resolution": 512, "batch_size": 4,
                          "gflops_per_sample_unet": 2270.0,
                          "rows": [{"name": "ddp", "samples_per_s": 10.0, "peak_gpu_mem_gb": 40.5,
                                    "share_of_peak": 10.0 * 2270e9 / 989e12}]}}}
    md = report_markdown(r)
    assert "## Scoring\n\nFailed: `RuntimeError: CUDA out of memory`" in md and "## Reward training" not in md
    assert "| ddp | 10.00 | 40.50 | 2.3% |" in md
