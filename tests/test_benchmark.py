"""The training benchmark runs and compares like with like (memory-fed, so it needs no Ray)."""

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
