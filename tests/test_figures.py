"""Figs. 6/9: one prompt's images ranked by each scorer, from a folder or from generations Parquet."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sr_ray.core import images
from sr_ray.core.errors import DataError
from sr_ray.eval.figures import RankImagesConfig, rank_images

RED, GREEN, ORANGE = (230, 20, 20), (20, 230, 20), (200, 120, 20)
REDNESS, GREENNESS = "plugin_scorers:redness", "plugin_scorers:greenness"


def test_a_folder_ranked_by_two_scorers(tmp_path):
    (tmp_path / "pics").mkdir()
    for name, c in (("a.png", GREEN), ("b.jpg", RED), ("c.webp", ORANGE)):
        Image.new("RGB", (40, 30), c).save(tmp_path / "pics" / name)
    (tmp_path / "pics" / "notes.txt").write_text("not a picture")
    s = rank_images(RankImagesConfig(images=str(tmp_path / "pics"), prompt="a red thing", scorers=[REDNESS, GREENNESS],
                                     out=str(tmp_path / "ranked"), cell=64))
    red = s["ranks"][REDNESS]
    assert [n for n, _ in sorted(red.items(), key=lambda kv: kv[1]["rank"])] == ["b.jpg", "c.webp", "a.png"]
    assert [r["rank"] for r in s["ranks"][GREENNESS].values()] == [1, 2, 3]  # the opposite order, a.png first
    assert list(s["ranks"][GREENNESS]) == ["a.png", "c.webp", "b.jpg"]
    png = Image.open(tmp_path / "ranked.png")
    assert png.size == (120 + 3 * (64 + 4), 22 + 2 * (64 + 28 + 6))
    assert png.getpixel((120 + 10, 22 + 10))[0] > 200  # redness row: red first
    assert json.loads((tmp_path / "ranked.json").read_text())["prompt"] == "a red thing"


def test_generations_parquet_one_prompt_and_errors(tmp_path):
    cols = {"generation_id": ["x0", "x1", "y0"], "prompt": ["x", "x", "y"],
            "image": [images.encode_png(Image.new("RGB", (16, 16), c)) for c in (GREEN, RED, RED)]}
    pq.write_table(pa.table(cols), tmp_path / "gen.parquet")
    s = rank_images(RankImagesConfig(images=str(tmp_path / "gen.parquet"), scorers=[REDNESS], out=str(tmp_path / "r")))
    assert s["prompt"] == "x" and s["images"] == 2 and s["ranks"][REDNESS]["x1"]["rank"] == 1
    with pytest.raises(DataError, match="no rows with prompt='z'"):
        rank_images(RankImagesConfig(images=str(tmp_path / "gen.parquet"), prompt="z", scorers=[REDNESS],
                                     out=str(tmp_path / "r")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no pictures"):
        rank_images(RankImagesConfig(images=str(tmp_path / "empty"), prompt="p", scorers=[REDNESS],
                                     out=str(tmp_path / "r")))
    with pytest.raises(DataError, match="give prompt="):
        (tmp_path / "pics").mkdir()
        Image.new("RGB", (8, 8), RED).save(tmp_path / "pics" / "a.png")
        rank_images(RankImagesConfig(images=str(tmp_path / "pics"), scorers=[REDNESS], out=str(tmp_path / "r")))
