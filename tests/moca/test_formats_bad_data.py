"""The published formats under the bad-data rules: images given as bytes go through the same safe opener as
image files (pixel bound from the header, not-an-image / corrupt reasons), published image paths are confined to
their image root unless ``allow_outside_paths``, parquet ``content`` strings are parsed with the nesting bound,
and merged record sets keep each file's image settings."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from moca.data.images import ImageError, open_image_bytes
from moca.data.loader import PackingLoader, RecordSet
from moca.data.processor import BadRecord, MocaProcessor
from moca.data.published import EncodedImage, read_mmeb_task
from moca.data.retrieval import PairLoader, SubsetConfig, check_side
from tests.helpers import png_bomb, png_bytes

PH = "<|vision_start|><|image_pad|><|vision_end|>"
pytestmark = pytest.mark.usefixtures("one_thread")


def _write_parquet(path, rows, **kw):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, **kw)
    return path


def test_too_large_image_bytes_in_a_pretrain_row_are_a_named_bad_record(tmp_path):
    rows = [{"text": f"row {i} shows {PH} a square", "images": [png_bytes(seed=i)]} for i in range(4)]
    rows[2]["images"] = [png_bomb()]                       # row 3 (counted from 1): 10000 x 10000 in its header
    f = _write_parquet(tmp_path / "pt.parquet", rows, row_group_size=2)
    proc = MocaProcessor.tiny(56)
    loader = PackingLoader(RecordSet([f], format="moca_pretrain"), proc, 4096, shuffle=False, max_samples=1)
    loader.next_micro_batch()                           # row 1; row 2 is read ahead, then row 3 fails
    with pytest.raises(BadRecord, match=r"record pt\.parquet:3: image pt\.parquet:3 images\[0\] is 10000 x 10000 = "
                                        r"100000000 pixels, more than max_image_pixels .*skip_bad") as e:
        loader.next_micro_batch()
    assert e.value.reason == "image_too_large"
    loader = PackingLoader(RecordSet([f], format="moca_pretrain"), proc, 4096, shuffle=False, max_samples=1,
                           skip_bad=True)
    seen = [loader.next_micro_batch()[0].record_id for _ in range(9)]        # three epochs over the 3 good rows
    assert seen == ["pt.parquet:1", "pt.parquet:2", "pt.parquet:4"] * 3
    assert dict(loader.skipped) == {"image_too_large": 1} and loader.bad == {2: "image_too_large"}
    assert loader.state_dict()["bad"] == {"2": "image_too_large"}
    # the configured bound applies to bytes too: 40 x 28 = 1120 pixels above a bound of 1000
    small = PackingLoader(RecordSet([f], format="moca_pretrain", max_image_pixels=1000), proc, 4096, shuffle=False)
    with pytest.raises(BadRecord, match=r"pt\.parquet:1 images\[0\] is 40 x 28 = 1120 pixels, more than "
                                        r"max_image_pixels \(1000\)"):
        small.next_micro_batch()


def test_image_bytes_share_the_reasons_of_image_files():
    spec = MocaProcessor.tiny(56).image_spec
    assert open_image_bytes(png_bytes(), "k").size == (40, 28)
    assert EncodedImage(png_bytes(), "k").decode().size == (40, 28)
    cases = {b"plain text, not an image": "not_an_image", png_bytes()[:200]: "corrupt_image",
             png_bomb(): "image_too_large"}
    for data, reason in cases.items():
        with pytest.raises(ImageError, match=r"image t\.parquet:7 ") as e:
            EncodedImage(data, "t.parquet:7").decode()
        assert e.value.reason == reason
    thin = io.BytesIO()
    Image.fromarray(np.zeros((1, 400, 3), np.uint8)).save(thin, format="PNG")
    with pytest.raises(ImageError, match="aspect ratio 400 is above 200") as e:
        EncodedImage(thin.getvalue(), "t.parquet:8").decode(spec=spec)
    assert e.value.reason == "bad_image_size"
    # a side holding bytes is checked from the header up front (BEIR corpora in eval)
    with pytest.raises(BadRecord, match=r"corpus-id 3: image c\.parquet:3 is 10000 x 10000") as e:
        check_side({"image": EncodedImage(png_bomb(), "c.parquet:3")}, "corpus-id 3")
    assert e.value.reason == "image_too_large"


def test_published_image_paths_stay_inside_the_image_root(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    (img / "a.png").write_bytes(png_bytes())
    (tmp_path / "outside.png").write_bytes(png_bytes(seed=1))
    rows = [{"qry": f"<|image_1|> query {i}", "qry_image_path": "a.png", "pos_text": f"positive {i}",
             "pos_image_path": "", "neg_text": "['n']", "neg_image_path": "['']"} for i in range(5)]
    rows[3]["qry_image_path"] = "../outside.png"
    f = _write_parquet(tmp_path / "pairs.parquet", rows)
    cfg = SubsetConfig(name="p", files=[str(f)], format="pairs", image_root=str(img))
    proc = MocaProcessor.tiny(56)
    with pytest.raises(BadRecord, match=r"pairs\.parquet:4.*'\.\./outside\.png' resolves to .*outside the data "
                                        r"folder") as e:
        PairLoader([cfg], proc, 2, hard_negatives=1)
    assert e.value.reason == "outside_data_folder"
    loader = PairLoader([cfg], proc, 2, hard_negatives=1, skip_bad=True)
    assert len(loader.subsets[0]) == 4 and dict(loader.skipped) == {"outside_data_folder": 1}
    assert len(PairLoader([cfg], proc, 2, hard_negatives=1, allow_outside_paths=True).subsets[0]) == 5
    # MMEB-eval tasks: the same rule, named by row and side
    task = tmp_path / "task"
    task.mkdir()
    _write_parquet(task / "t.parquet", [{"qry_text": "<|image_1|> what is it", "qry_img_path": "../outside.png",
                                         "tgt_text": ["red", "blue"], "tgt_img_path": ["", ""]}])
    with pytest.raises(ImageError, match=r"t\.parquet:1 query: image path '\.\./outside\.png' resolves to"):
        read_mmeb_task(task, img)
    recs = read_mmeb_task(task, img, allow_outside_paths=True)
    assert recs[0].query["content"][0] == {"image": str(img / "../outside.png")}


def test_parquet_content_strings_are_parsed_with_the_nesting_bound(tmp_path):
    deep = "[" * 100 + "]" * 100
    rows = [{"id": "ok", "content": json.dumps([{"text": "fine"}])}, {"id": "deep", "content": deep}]
    rs = RecordSet([_write_parquet(tmp_path / "c.parquet", rows)])
    assert rs.get(0)[0]["content"] == [{"text": "fine"}]
    with pytest.raises(BadRecord, match=r"c\.parquet:2: 'content' is nested more than 64 levels deep") as e:
        rs.get(1)
    assert e.value.reason == "malformed"


def test_extend_keeps_each_files_image_settings(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "r.jsonl").write_text(json.dumps({"text": f"from {d}"}) + "\n")
    a = RecordSet(tmp_path / "a" / "r.jsonl", max_image_pixels=100)
    b = RecordSet(tmp_path / "b" / "r.jsonl", image_root=tmp_path, allow_outside_paths=True, max_image_pixels=None)
    a.extend(b)
    ra, rb = a.get(0)[2], a.get(1)[2]
    assert (ra.folder, ra.allow_outside, ra.max_pixels) == (tmp_path / "a", False, 100)
    assert (rb.folder, rb.allow_outside, rb.max_pixels) == (tmp_path, True, None)
    with pytest.raises(ValueError, match="different image settings"):
        RecordSet(tmp_path / "b" / "r.jsonl").extend(b)
