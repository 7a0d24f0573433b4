"""sr-ray's peer scorers equal to the peers' own code (hpsv2, image-reward, the LAION aesthetic recipe, PickScore's
README code), run from a second virtual environment on the same random weights in the peers' published
formats. Extended: the first run makes that environment (jobs/reference/make_venv.sh, several minutes)."""

import pytest

from sr_ray.bench.verify_scorers import VerifyScorersConfig, verify_scorers


@pytest.mark.extended
def test_every_peer_scorer_equals_its_reference_to_1e_4(tmp_path):
    s = verify_scorers(VerifyScorersConfig(out=str(tmp_path / "v")))
    assert set(s["results"]) == {"hpsv2", "imagereward", "laion_aesthetic/linear", "laion_aesthetic/mlp", "pickscore"}
    for name, r in s["results"].items():
        assert r["equal"] and r["max_abs_diff"] <= 1e-4, name
        assert r["spread"] > 100 * r["max_abs_diff"], name  # the scores differ between pairs: not a constant
    assert s["all_equal"]
