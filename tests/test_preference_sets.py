"""Importers of the peers' public test sets into the triplet contract: pairs worked out by hand, ties kept and
marked, malformed input named by file, item/row and field."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sr_ray.core.errors import DataError
from sr_ray.eval.preference_sets import detect, import_set, set_names


def test_pickapic_rows_become_pairs_with_ties_marked(tmp_path):
    t = pa.table({"caption": ["a", "b", "c", "d"], "jpg_0": [b"A0", b"B0", b"C0", b"D0"],
                  "jpg_1": [b"A1", b"B1", b"C1", b"D1"], "label_0": [1.0, 0.0, 0.5, 1.0],
                  "label_1": [0.0, 1.0, 0.5, 0.0], "image_0_uid": ["a0", "b0", "c0", "d0"],
                  "image_1_uid": ["a1", "b1", "c1", "d1"], "has_label": [True, True, True, False]})
    pq.write_table(t, tmp_path / "test.parquet")
    assert detect(str(tmp_path / "test.parquet")) == "pickapic"
    out = import_set(str(tmp_path / "test.parquet")).to_pydict()
    assert out["prompt"] == ["a", "b", "c"]  # the unlabelled row is left out
    assert out["pos_image"] == [b"A0", b"B1", b"C0"] and out["neg_image"] == [b"A1", b"B0", b"C1"]
    assert out["pos_id"] == ["a0", "b1", "c0"] and out["tie"] == [False, False, True]
    pq.write_table(t.drop(["label_1"]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: lacks Pick-a-Pic field\(s\) \['label_1'\]"):
        import_set(str(tmp_path / "bad.parquet"), "pickapic")


def test_imagereward_and_hpd_rankings_become_every_ordered_pair(tmp_path):
    items = [{"id": "p1", "prompt": "x", "generations": ["1.webp", "2.webp", "3.webp"], "ranking": [1, 3, 2]},
             {"id": "p2", "prompt": "y", "generations": ["4.webp", "5.webp"], "ranking": [2, 2]}]
    (tmp_path / "test.json").write_text(json.dumps(items))
    assert detect(str(tmp_path / "test.json")) == "imagereward"
    out = import_set(str(tmp_path / "test.json")).to_pydict()
    root = str(tmp_path / "test_images")
    # ranks 1 < 2 < 3: (1 over 3), (1 over 2), (3 over 2) by file; equal ranks give no pair
    assert [(p.rsplit("/", 1)[1], n.rsplit("/", 1)[1]) for p, n in zip(out["pos_path"], out["neg_path"])] == \
        [("1.webp", "2.webp"), ("1.webp", "3.webp"), ("3.webp", "2.webp")]
    assert all(p.startswith(root) for p in out["pos_path"]) and out["pos_id"][0] == "p1:0"
    hpd = [{"prompt": "z", "image_path": ["a.png", "b.png"], "rank": [2, 1]}]
    (tmp_path / "h.json").write_text(json.dumps(hpd))
    h = import_set(str(tmp_path / "h.json"), image_root="s3://b/imgs").to_pydict()
    assert h["pos_path"] == ["s3://b/imgs/b.png"] and h["neg_path"] == ["s3://b/imgs/a.png"]


@pytest.mark.parametrize("item, msg", [
    ({"prompt": "x", "image_path": ["a"]}, r"item 0: no field 'rank'"),
    ({"prompt": "x", "image_path": ["a", "b"], "rank": [1]}, r"item 0: fields 'image_path' and 'rank' must be"),
    ({"prompt": "x", "image_path": ["a", "b"], "rank": [1, "two"]}, r"item 0: field 'rank'\[1\] = 'two' is not a"),
    ({"prompt": "", "image_path": ["a"], "rank": [1]}, r"item 0: field 'prompt' is not a non-empty string"),
])
def test_malformed_json_items_are_named(tmp_path, item, msg):
    (tmp_path / "test.json").write_text(json.dumps([item]))
    with pytest.raises(DataError, match=msg):
        import_set(str(tmp_path / "test.json"), "hpdv2")


def test_authors_csv_and_set_names(tmp_path):
    (tmp_path / "pairs.csv").write_text("prompt,pos_path,neg_path\na cat,p/1.jpg,/abs/2.jpg\n")
    out = import_set(str(tmp_path / "pairs.csv")).to_pydict()
    assert out["pos_path"] == [str(tmp_path / "p" / "1.jpg")] and out["neg_path"] == ["/abs/2.jpg"]
    (tmp_path / "bad.csv").write_text("prompt,pos_path,neg_path\na cat,1.jpg,\n")
    with pytest.raises(DataError, match=r"bad.csv row 2: field 'neg_path' is empty"):
        import_set(str(tmp_path / "bad.csv"))
    (tmp_path / "cols.csv").write_text("prompt,good,bad\n")
    with pytest.raises(DataError, match=r"cols.csv: lacks column\(s\) \['pos_path', 'neg_path'\]"):
        import_set(str(tmp_path / "cols.csv"))
    assert set_names(["s3://b/picsart/test", "/d/hpdv2/test.json", "/d/pick.parquet"]) == \
        ["picsart_test", "hpdv2_test", "pick"]
