"""main's Stage 1 / Stage 2 data features through the streaming loaders (the merge of ``stream`` into main):
``moca_pretrain`` rows as a stream format (images as bytes, the pixel bound), image paths confined to the shard's
folder or ``image_root``, ``max_length`` truncation, JSONL lines parsed by ``parse_record_line`` (bad UTF-8 / a
byte order mark), and Stage 2 ``data.stream: true`` with ``format: pairs`` (``max_records`` refused)."""

import json

import numpy as np
import pytest
from PIL import Image

from moca.config import from_dict
from moca.data.processor import BadRecord, MocaProcessor
from moca.data.retrieval import SubsetConfig
from moca.data.stream import StreamLoader
from moca.data.stream_pairs import StreamPairLoader
from tests.helpers import png_bomb, png_bytes

PH = "<|vision_start|><|image_pad|><|vision_end|>"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def proc():
    return MocaProcessor.tiny(56)


def _loader(path, proc, **kw):
    kw.setdefault("shuffle", False)
    return StreamLoader([{"name": "s", "path": str(path)}], proc, kw.pop("budget", 4096), max_samples=1, **kw)


def test_pretrain_rows_stream_with_images_as_bytes_and_the_pixel_bound(tmp_path, proc):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"row {i} shows {PH} a square", "images": [png_bytes(seed=i)]} for i in range(4)]
    rows[2]["images"] = [png_bomb()]                       # row 3: 10000 x 10000 in its header, never decoded
    f = tmp_path / "pt.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f, row_group_size=2)
    loader = _loader(f, proc, format="moca_pretrain")
    first = loader.next_micro_batch()[0]
    assert first.record_id == "s/pt.parquet:1" and first.image_grid_thw.shape == (1, 3)
    with pytest.raises(BadRecord, match=r"record s/pt\.parquet:3: image s/pt\.parquet:3 images\[0\] is 10000 x "
                                        r"10000 = 100000000 pixels, more than max_image_pixels .*skip_bad") as e:
        loader.next_micro_batch()
    assert e.value.reason == "image_too_large"
    skipping = _loader(f, proc, format="moca_pretrain", skip_bad=True)
    seen = [skipping.next_micro_batch()[0].record_id for _ in range(9)]          # three epochs over 3 good rows
    assert seen == ["s/pt.parquet:1", "s/pt.parquet:2", "s/pt.parquet:4"] * 3
    assert dict(skipping.skipped) == {"image_too_large": 1}                      # counted once
    small = _loader(f, proc, format="moca_pretrain", max_image_pixels=1000)      # the bound applies to bytes too
    with pytest.raises(BadRecord, match=r"images\[0\] is 40 x 28 = 1120 pixels, more than max_image_pixels \(1000\)"):
        small.next_micro_batch()
    pq.write_table(pa.Table.from_pylist([{"text": f"two {PH}{PH}", "images": [png_bytes()]}]), tmp_path / "b.parquet")
    with pytest.raises(BadRecord, match=r"s/b\.parquet:1: the text has 2 image placeholder\(s\) but 1 image") as e:
        _loader(tmp_path / "b.parquet", proc, format="moca_pretrain").next_micro_batch()
    assert e.value.reason == "malformed"


def test_image_paths_are_confined_to_the_shard_folder_or_the_image_root(tmp_path, proc):
    d, imgs = tmp_path / "data", tmp_path / "imgs"
    d.mkdir()
    imgs.mkdir()
    Image.fromarray(np.full((56, 56, 3), 90, np.uint8)).save(tmp_path / "outside.png")
    Image.fromarray(np.full((56, 56, 3), 30, np.uint8)).save(imgs / "in.png")
    Image.fromarray(np.full((56, 56, 3), 60, np.uint8)).save(d / "here.png")
    f = d / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "up", "content": [{"text": "a"}, {"image": "../outside.png"}]},
        {"id": "here", "content": [{"text": "b"}, {"image": "here.png"}]}]))
    with pytest.raises(BadRecord, match=r"record up \(s/t\.jsonl:1\): image path '\.\./outside\.png' resolves to "
                                        r".*outside the data folder") as e:
        _loader(f, proc).next_micro_batch()
    assert e.value.reason == "outside_data_folder"
    ok = _loader(f, proc, allow_outside_paths=True)
    assert [ok.next_micro_batch()[0].record_id.split()[0] for _ in range(2)] == ["up", "here"]
    g = d / "r.jsonl"                                   # a configured root: relative paths resolve there
    g.write_text(json.dumps({"id": "in", "content": [{"text": "c"}, {"image": "in.png"}]}) + "\n" +
                 json.dumps({"id": "here", "content": [{"text": "d"}, {"image": "../data/here.png"}]}) + "\n")
    rooted = _loader(g, proc, image_root=imgs, skip_bad=True)
    assert [rooted.next_micro_batch()[0].record_id.split()[0] for _ in range(2)] == ["in", "in"]
    assert dict(rooted.skipped) == {"outside_data_folder": 1}


def test_max_length_truncates_streamed_samples_and_lines_parse_as_main(tmp_path, proc):
    Image.new("RGB", (56, 56), (10, 200, 10)).save(tmp_path / "g.png")
    rec = {"content": [{"text": "one two three four"}, {"image": "g.png"}, {"text": "five six seven eight"}]}
    full = proc.process(rec, "r", tmp_path)
    n_before = full.input_ids.tolist().index(proc.ids["vision_start"])
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(rec).encode() + b"\n")          # a byte order mark: read as main
    cut = _loader(f, proc, budget=n_before + 1, max_length=n_before + 1).next_micro_batch()
    assert [len(s) for s in cut] == [n_before + 1] and cut[0].pixel_values is None    # the cut image dropped
    assert cut[0].input_ids[-1] == proc.ids["endoftext"]
    with pytest.raises(BadRecord, match=r"s/d\.jsonl:1: is \d+ tokens long, more than the token budget"):
        _loader(f, proc, budget=n_before + 1).next_micro_batch()                    # without max_length: too long
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" +
                    json.dumps({"id": "x", "text": "a capt"}).encode().replace(b"capt", b"capt\xff") + b"\n" +
                    b'{"text": "x", "e": ' + b"[" * 100 + b"]" * 100 + b"}\n")
    with pytest.raises(BadRecord, match=r"record s/bad\.jsonl:2: is not valid UTF-8 \(byte 0xff at column \d+\)"):
        _loader(bad, proc).next_micro_batch()                                       # line 2 read ahead
    skipping = _loader(bad, proc, skip_bad=True)
    assert [len(skipping.next_micro_batch()) for _ in range(4)] == [1] * 4
    assert dict(skipping.skipped) == {"malformed": 2}                              # not UTF-8; nested > 64 levels


def test_stage2_stream_takes_pairs_subsets_and_refuses_max_records(tmp_path, proc):
    from moca.train.contrastive import ClConfig

    from .published_fixtures import write_pairs

    pairs = write_pairs(tmp_path / "p.parquet", tmp_path / "img", n=8)
    cfg = SubsetConfig(name="p", files=[str(pairs)], format="pairs", image_root=str(tmp_path / "img"))
    loader = StreamPairLoader([cfg], proc, 4, hard_negatives=2, shuffle=False)
    b = loader.next_micro_batch()
    assert len(b.queries) == 4 and len(b.docs) == 4 + 4 * 2                    # one negative padded to two
    assert b.queries[0].image_grid_thw is not None and b.record_ids[0] == "p/p.parquet:1"
    with pytest.raises(BadRecord, match=r"p/p\.parquet:\d+: has 1 hard negatives.*pad_negatives: true"):
        for _ in range(3):
            StreamPairLoader([cfg], proc, 4, hard_negatives=2, shuffle=False, pad_negatives=False).next_micro_batch()
    short = StreamPairLoader([cfg], proc, 4, hard_negatives=1, shuffle=False, max_length=4).next_micro_batch()
    assert max(len(s) for s in short.queries + short.docs) <= 4
    capped = SubsetConfig(name="p", files=[str(pairs)], format="pairs", image_root=str(tmp_path / "img"),
                          max_records=5)
    with pytest.raises(ValueError, match=r"data.stream: true cannot take data.subsets\[\].max_records \(set for p\)"):
        StreamPairLoader([capped], proc, 4, hard_negatives=1)
    with pytest.raises(ValueError, match=r"data.stream: true cannot take data.subsets\[0\].max_records"):
        from_dict(ClConfig, {"data": {"stream": True, "subsets": [
            {"name": "p", "files": [str(pairs)], "max_records": 5}]}})
