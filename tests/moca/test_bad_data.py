"""Bad data in both stages: each kind is refused naming the file, the line and the reason, or under
``data.skip_bad`` counted once and skipped by name; image paths in records stay inside the data folder unless
``allow_outside_paths`` is set; direct ``encode`` calls are not confined."""

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moca.config import from_dict, load_config
from moca.data.images import ImageError, ImageRoot, check_image, open_image, resolve_image_path
from moca.data.loader import PackingLoader, RecordSet
from moca.data.processor import BadRecord, MocaProcessor
from moca.data.retrieval import PairLoader, SubsetConfig, check_side, read_jsonl
from moca.eval import EvalConfig
from moca.train.contrastive import ClConfig, run_cl
from moca.train.core import DistEnv
from moca.train.cpt import CptConfig, run_cpt
from tests.helpers import png_bomb

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "model.tiny_kv_heads=1",
        "model.tiny_vision_hidden=16", "model.tiny_vision_depth=1", "model.tiny_image_size=56"]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.log_every=1", "train.save_every=0"]

# kind -> (what the error says, the skip reason)
KINDS = {
    "bomb": (r"bomb.png has more than \d+ pixels, more than max_image_pixels", "image_too_large"),
    "deep": (r"nested too deeply", "malformed"),
    "utf8": (r"not valid UTF-8 \(byte 0xff at column \d+\)", "malformed"),
    "truncated": (r"truncated.png cannot be decoded \(OSError: image file is truncated", "corrupt_image"),
    "not_image": (r"not_image.png cannot be read: not an image file", "not_an_image"),
    "thin": (r"thin.png \(400 x 1\) cannot be used: image aspect ratio 400 is above 200", "bad_image_size"),
    "vision_token": (r"text contains the vision placeholder token <\|image_pad\|>", "vision_token_in_text"),
    "surrogate": (r"text is not valid Unicode \(surrogates not allowed", "malformed"),   # was a tokenizer TypeError
}
IMAGE_OF = {"bomb": "bomb.png", "truncated": "truncated.png", "not_image": "not_image.png", "thin": "thin.png"}
pytestmark = pytest.mark.usefixtures("one_thread")


def _bomb(path: Path, w: int = 20000, h: int = 20000) -> None:
    """A PNG whose header says w x h (1 bit per pixel): what a decompression bomb looks like before decoding."""
    path.write_bytes(png_bomb(w, h))


def _images(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(d / f"g{i}.png")
    _bomb(d / "bomb.png")
    full = (d / "g0.png").read_bytes()
    (d / "truncated.png").write_bytes(full[:len(full) // 2])      # a valid header, half the pixel data
    (d / "not_image.png").write_text("plain text, not an image")
    Image.fromarray(np.zeros((1, 400, 3), np.uint8)).save(d / "thin.png")


def _bad_line(kind: str, stage: str) -> bytes:
    if kind == "deep":
        return b'{"id": "bad_deep", "text": "x", "extra": ' + b"[" * 50000 + b"]" * 50000 + b"}"
    img = IMAGE_OF.get(kind, "g9.png")
    text = {"vision_token": "look <|image_pad|> here", "surrogate": "a \ud800 b"}.get(kind, "a caption")
    if stage == "cpt":
        rec = {"id": f"bad_{kind}", "content": [{"text": text}, {"image": img}]}
    else:
        rec = {"id": f"bad_{kind}", "query": text, "positive": {"image": img}, "negatives": [{"image": "g8.png"}]}
    line = json.dumps(rec).encode()
    return line.replace(b"a caption", b"a capt\xffion") if kind == "utf8" else line


def _write(d: Path, stage: str, kinds, n_good: int = 6) -> Path:
    """n_good good records, the bad ones (one per kind) from line 4 on; returns the JSONL file."""
    _images(d)
    lines = []
    for i in range(n_good):
        if stage == "cpt":
            rec = {"id": f"r{i}", "content": [{"text": f"document {i} words"}, {"image": f"g{i}.png"}]}
        else:
            rec = {"id": f"r{i}", "query": f"caption {i}", "positive": {"image": f"g{i}.png"},
                   "negatives": [{"image": f"g{(i + 1) % n_good}.png"}]}
        lines.append(json.dumps(rec).encode())
    lines[3:3] = [_bad_line(k, stage) for k in kinds]
    f = d / "train.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    return f


def _cpt(f: Path, out: Path, *over):
    return load_config(CptConfig, ROOT / "moca/configs/cpt_tiny.yaml",
                       [f"data.train=['{f}']", f"train.output_dir={out}", "train.max_steps=2", "data.token_budget=512",
                        "data.prefetch=0", *TINY, *QUIET, *over])


def _cl(f: Path, out: Path, *over, batch: int = 4):
    sub = json.dumps([{"name": "s", "files": [str(f)]}])
    return load_config(ClConfig, ROOT / "moca/configs/cl_tiny.yaml",
                       [f"data.subsets={sub}", f"train.output_dir={out}", "train.max_steps=2",
                        f"data.global_batch_size={batch}", *TINY, *QUIET, *over])


# ------------------------------------------------------------------------------------------------------------
# Each kind without skip_bad: refused naming file, line and reason
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["cpt", "cl"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_bad_kind_is_refused_naming_file_line_and_reason(tmp_path, stage, kind):
    f = _write(tmp_path / "data", stage, [kind])
    cfg = _cpt(f, tmp_path / "run") if stage == "cpt" else _cl(f, tmp_path / "run")
    with pytest.raises(BadRecord, match=r"train.jsonl:4\).*" if kind not in ("deep", "utf8") else r"train.jsonl:4: ") as e:
        (run_cpt if stage == "cpt" else run_cl)(cfg, DistEnv())
    import re
    assert re.search(KINDS[kind][0], str(e.value)), str(e.value)
    assert "skip_bad" in str(e.value) and e.value.reason == KINDS[kind][1]


# ------------------------------------------------------------------------------------------------------------
# With skip_bad: each counted once and named, the run trains
# ------------------------------------------------------------------------------------------------------------


def _named(caplog, kinds):
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "moca.data")
    return [k for k in kinds if (f"bad_{k}" if k not in ("deep", "utf8") else "train.jsonl:4") in text]


def test_stage1_skip_bad_skips_every_kind_and_counts_each_record_once(tmp_path, caplog):
    kinds = list(KINDS)
    f = _write(tmp_path / "data", "cpt", kinds, n_good=3)
    caplog.set_level(logging.WARNING, "moca.data")
    hist = run_cpt(_cpt(f, tmp_path / "run", "data.skip_bad=true"), DistEnv())   # 3 good records: many epochs
    assert [h["step"] for h in hist] == [1, 2] and all(np.isfinite(h["loss"]) for h in hist)
    want = Counter(KINDS[k][1] for k in kinds)
    assert hist[-1]["skipped"] == len(kinds) and hist[-1]["skipped_by_reason"] == dict(want)
    assert len(_named(caplog, [k for k in kinds if k != "deep"])) == len(kinds) - 1   # each named (deep: by line)


def test_stage1_a_bad_record_is_counted_once_over_many_epochs(tmp_path):
    """A truncated image met in every epoch was counted in every one (16 after 2 steps)."""
    f = _write(tmp_path / "data", "cpt", ["truncated"], n_good=2)
    loader = PackingLoader(RecordSet(f), MocaProcessor.tiny(56), token_budget=400, skip_bad=True)
    for _ in range(5):
        loader.next_micro_batch()
    assert loader.epoch >= 4 and dict(loader.skipped) == {"corrupt_image": 1}
    state = loader.state_dict()
    again = PackingLoader(RecordSet(f), MocaProcessor.tiny(56), token_budget=400, skip_bad=True)
    again.load_state_dict(json.loads(json.dumps(state)))   # through JSON, as in a checkpoint
    for _ in range(3):
        again.next_micro_batch()
    assert dict(again.skipped) == {"corrupt_image": 1}


def test_stage2_skip_bad_skips_every_kind_and_trains(tmp_path, caplog):
    kinds = list(KINDS)
    f = _write(tmp_path / "data", "cl", kinds, n_good=6)
    caplog.set_level(logging.WARNING, "moca.data")
    # 7 usable records (6 good + the truncated one, which only decoding finds), batches of 6: every step meets it
    hist = run_cl(_cl(f, tmp_path / "run", "data.skip_bad=true", batch=6), DistEnv())
    assert [h["step"] for h in hist] == [1, 2] and all(np.isfinite(h["loss"]) for h in hist)
    want = Counter(KINDS[k][1] for k in kinds)
    assert hist[-1]["skipped"] == len(kinds) and hist[-1]["skipped_by_reason"] == dict(want)
    assert len(_named(caplog, [k for k in kinds if k != "deep"])) == len(kinds) - 1


def test_stage2_a_record_found_bad_in_a_batch_gets_a_stand_in_and_is_counted_once(tmp_path):
    f = _write(tmp_path / "data", "cl", ["truncated"], n_good=9)
    proc = MocaProcessor.tiny(56)
    cfg = SubsetConfig(name="s", files=[str(f)])
    with pytest.raises(BadRecord, match=r"bad_truncated \(train.jsonl:4\) positive: .*truncated.*skip_bad"):
        loader = PairLoader([cfg], proc, 5, hard_negatives=1, seed=1)
        for _ in range(10):
            loader.next_micro_batch()
    loader = PairLoader([cfg], proc, 5, hard_negatives=1, seed=1, skip_bad=True)
    assert len(loader.subsets[0]) == 10                      # the header is fine: found only when decoded
    for _ in range(8):                                       # 4 epochs of 2 batches
        batch = loader.next_micro_batch()
        assert len(batch.queries) == 5 and len(set(batch.record_ids)) == 5
        assert not any("bad_truncated" in r for r in batch.record_ids)
    assert dict(loader.skipped) == {"corrupt_image": 1}
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = PairLoader([cfg], proc, 5, hard_negatives=1, seed=1, skip_bad=True)
    resumed.load_state_dict(state)
    assert dict(resumed.skipped) == {"corrupt_image": 1}
    a, b = loader.next_micro_batch(), resumed.next_micro_batch()
    assert a.record_ids == b.record_ids


def test_stage2_up_front_counts_are_reported_once_over_ranks(tmp_path):
    """Every rank checks every record: rank 1 must not report them again (the trainer sums over ranks)."""
    f = _write(tmp_path / "data", "cl", ["not_image"], n_good=8)
    cfg = SubsetConfig(name="s", files=[str(f)])
    counts = [sum(PairLoader([cfg], MocaProcessor.tiny(56), 4, hard_negatives=1, rank=r, world_size=2,
                             skip_bad=True).skipped.values()) for r in (0, 1)]
    assert sum(counts) == 1


def test_pixel_bound_is_configurable_and_checked_from_the_header(tmp_path):
    d = tmp_path / "data"
    _images(d)
    with pytest.raises(ImageError, match=r"56 x 56 = 3136 pixels, more than max_image_pixels \(3000\)") as e:
        open_image(d / "g0.png", max_pixels=3000)
    assert e.value.reason == "image_too_large"
    assert open_image(d / "g0.png", max_pixels=3136).size == (56, 56)
    check_image(d / "bomb.png", max_pixels=None)            # header only: nothing decoded, no bound
    with pytest.raises(ImageError, match=r"/dev/null is not a regular file"):   # a pipe or device: never read
        open_image("/dev/null")
    f = _write(d, "cpt", [], n_good=4)
    with pytest.raises(BadRecord, match=r"r\d \((train/)?train.jsonl:\d\): image .* more than max_image_pixels \(3000\)"):
        run_cpt(_cpt(f, tmp_path / "run", "data.max_image_pixels=3000"), DistEnv())
    for bad in ("0", "-5", "1.5", "true"):
        with pytest.raises(ValueError, match=r"data.max_image_pixels(:| must be an integer >= 1 or null)"):
            load_config(CptConfig, None, [f"data.max_image_pixels={bad}"])
        with pytest.raises(ValueError, match=r"data.max_image_pixels(:| must be an integer >= 1 or null)"):
            load_config(ClConfig, None, [f"data.max_image_pixels={bad}"])
    assert load_config(CptConfig, None, ["data.max_image_pixels=null"]).data.max_image_pixels is None


def test_jsonl_readers_name_the_file_and_line_of_a_bad_line(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_bytes(b'{"id": 1}\n{"id": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2: is not valid UTF-8 \(byte 0xe9 at column 12\)"):
        read_jsonl(f)
    f.write_bytes(b'{"id": 1}\n\n' + b"[" * 5000 + b"]" * 5000 + b"\n")
    with pytest.raises(ValueError, match=r"t.jsonl:3: is nested too deeply"):
        read_jsonl(f)
    f.write_bytes(b'{"id": 1, "x": ' + b"[" * 70 + b"]" * 70 + b"}\n")
    with pytest.raises(ValueError, match=r"t.jsonl:1: is nested more than 64 levels deep"):
        read_jsonl(f)
    f.write_bytes(b'\xef\xbb\xbf{"id": 1}\n')                 # a byte order mark is not an error
    assert read_jsonl(f) == [{"id": 1}]


# ------------------------------------------------------------------------------------------------------------
# Image paths stay inside the data folder
# ------------------------------------------------------------------------------------------------------------


def _escapes(tmp_path: Path):
    """A data folder with records whose image paths escape it in each way; returns (folder, {kind: path})."""
    d = tmp_path / "data"
    _images(d)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (56, 56), (200, 10, 10)).save(outside)
    (d / "link.png").symlink_to(outside)
    (d / "passwd_link.png").symlink_to("/etc/passwd")
    return d, {"dotdot": "../outside.png", "absolute": str(outside), "symlink": "link.png",
               "etc_passwd": "/etc/passwd", "symlink_passwd": "passwd_link.png"}


@pytest.fixture
def opened(monkeypatch):
    """Paths Pillow was asked to open."""
    seen = []
    real = Image.open

    def spy(fp, *a, **k):
        seen.append(str(fp))
        return real(fp, *a, **k)

    monkeypatch.setattr(Image, "open", spy)
    return seen


@pytest.mark.parametrize("stage", ["cpt", "cl"])
def test_image_paths_outside_the_data_folder_are_refused_naming_the_record(tmp_path, stage, opened):
    d, esc = _escapes(tmp_path)
    for kind, path in esc.items():
        f = d / f"{kind}.jsonl"
        if stage == "cpt":
            rec = {"id": kind, "content": [{"text": "a caption"}, {"image": path}]}
            f.write_text("\n".join([json.dumps({"id": "ok", "text": "fine"}), json.dumps(rec)]) + "\n")
            records = RecordSet(f)
            loader = PackingLoader(records, MocaProcessor.tiny(56), 512, shuffle=False)
            with pytest.raises(BadRecord, match=rf"record {kind} \({kind}.jsonl:2\): image path '{path}' resolves to "
                                                rf".*, outside the data folder .*allow_outside_paths"):
                loader.next_micro_batch()
            skipping = PackingLoader(records, MocaProcessor.tiny(56), 512, shuffle=False, skip_bad=True)
            skipping.next_micro_batch()
            assert dict(skipping.skipped) == {"outside_data_folder": 1}
        else:
            good = [{"id": f"r{i}", "query": f"q{i}", "positive": {"image": f"g{i}.png"},
                     "negatives": [{"image": "g9.png"}]} for i in range(4)]
            bad = dict(good[0], id=kind, negatives=[{"image": path}])
            f.write_text("".join(json.dumps(r) + "\n" for r in good + [bad]))
            cfg = SubsetConfig(name="s", files=[str(f)])
            with pytest.raises(BadRecord, match=rf"record {kind} \({kind}.jsonl:5\) negatives\[0\]: image path "
                                                rf"'{path}' resolves to .*, outside the data folder"):
                PairLoader([cfg], MocaProcessor.tiny(56), 4, hard_negatives=1)
            loader = PairLoader([cfg], MocaProcessor.tiny(56), 4, hard_negatives=1, skip_bad=True)
            assert dict(loader.skipped) == {"outside_data_folder": 1}
    assert not [p for p in opened if Path(p).name in ("outside.png", "passwd")], opened


def test_outside_paths_are_used_with_the_option_and_inside_paths_always(tmp_path, opened):
    d, esc = _escapes(tmp_path)
    lines = [{"id": kind, "content": [{"text": "a caption"}, {"image": esc[kind]}]}
             for kind in ("dotdot", "absolute", "symlink")]
    lines.append({"id": "inside_absolute", "content": [{"text": "x"}, {"image": str(d / "g1.png")}]})
    lines.append({"id": "inside_dotdot", "content": [{"text": "x"}, {"image": "../data/g2.png"}]})
    f = d / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in lines))
    hist = run_cpt(_cpt(f, tmp_path / "run", "data.allow_outside_paths=true", "train.max_steps=1"), DistEnv())
    assert hist[-1]["skipped"] == 0 and any(Path(p).name == "outside.png" for p in opened)
    loader = PackingLoader(RecordSet(f), MocaProcessor.tiny(56), 4096, shuffle=False, skip_bad=True, max_samples=2)
    ids = [s.record_id for s in loader.next_micro_batch()]
    assert [i.split()[0] for i in ids] == ["inside_absolute", "inside_dotdot"]       # by default
    assert dict(loader.skipped) == {"outside_data_folder": 3}
    # a configured image root: relative paths resolve there, and must stay inside it
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (56, 56)).save(root / "a.png")
    g = tmp_path / "elsewhere" / "t.jsonl"
    g.parent.mkdir()
    g.write_text(json.dumps({"id": "r", "content": [{"text": "x"}, {"image": "a.png"}]}) + "\n" +
                 json.dumps({"id": "up", "content": [{"text": "x"}, {"image": "../data/g0.png"}]}) + "\n")
    loader = PackingLoader(RecordSet(g, image_root=root), MocaProcessor.tiny(56), 4096, shuffle=False,
                           skip_bad=True, max_samples=1)
    assert [s.record_id for s in loader.next_micro_batch()] == ["r (t.jsonl:1)"]
    assert dict(loader.skipped) == {"outside_data_folder": 1}
    # Stage 2 has the same option
    pairs = [{"id": f"r{i}", "query": f"q{i}", "positive": {"image": f"g{i}.png"},
              "negatives": [{"image": [esc["dotdot"], esc["absolute"], esc["symlink"]][i % 3]}]} for i in range(4)]
    h = d / "pairs.jsonl"
    h.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    with pytest.raises(BadRecord, match=r"r0 \(pairs.jsonl:1\) negatives\[0\]: .*outside the data folder"):
        run_cl(_cl(h, tmp_path / "cl", "train.max_steps=1"), DistEnv())
    hist = run_cl(_cl(h, tmp_path / "cl", "train.max_steps=1", "data.allow_outside_paths=true"), DistEnv())
    assert hist[-1]["skipped"] == 0 and np.isfinite(hist[-1]["loss"])
    assert from_dict(EvalConfig, {"allow_outside_paths": True}).allow_outside_paths
    side = {"image": esc["dotdot"]}
    with pytest.raises(BadRecord, match="outside the data folder"):
        check_side(side, "t.jsonl:1 query", d)
    check_side(side, "t.jsonl:1 query", ImageRoot(d, allow_outside=True))


def test_direct_encode_calls_are_not_confined(tmp_path):
    from moca.embedding import MocaEmbedder

    _, esc = _escapes(tmp_path)
    model = MocaEmbedder.tiny(image_size=56)
    v = model.encode(images=[esc["absolute"], Path(esc["absolute"])])
    assert v.shape == (2, model.dim) and torch.allclose(v[0], v[1])
    assert resolve_image_path("/abs/x.png") == Path("/abs/x.png")      # no root: as given
    with pytest.raises(ValueError, match=r"images\[0\].*cannot be read: not an image file"):
        model.encode(images=["/etc/passwd"])                  # used as given, and still checked


def test_eval_tasks_refuse_outside_paths_unless_allowed(tmp_path, opened):
    from moca.embedding import MocaEmbedder
    from moca.eval import EvalTask, run_candidates

    d, esc = _escapes(tmp_path)
    f = d / "task.jsonl"
    f.write_text(json.dumps({"id": "q1", "query": "a red square", "answer": 0,
                             "candidates": [{"image": "g0.png"}, {"image": esc["dotdot"]}]}) + "\n")
    task = EvalTask(name="t", type="candidates", file=str(f))
    model = MocaEmbedder.tiny(image_size=56)
    with pytest.raises(ValueError, match=r"eval task t: q1 \(task.jsonl:1\) candidates\[1\]: image path "
                                         r"'../outside.png' resolves to .*outside the data folder"):
        run_candidates(model, task, from_dict(EvalConfig, {"show_progress": False}))
    assert not [p for p in opened if Path(p).name == "outside.png"]
    out = run_candidates(model, task, from_dict(EvalConfig, {"show_progress": False, "allow_outside_paths": True}))
    assert out["n_queries"] == 1 and any(Path(p).name == "outside.png" for p in opened)


@pytest.mark.parametrize("path, says", [("x" * 5000 + ".png", "cannot be used .*File name too long"),
                                        ("a\x00b.png", "cannot be resolved .*null byte")], ids=["long", "nul"])
def test_odd_image_paths_are_bad_records_naming_the_record(tmp_path, path, says):
    d = tmp_path / "data"
    _images(d)
    f = d / "t.jsonl"
    f.write_text(json.dumps({"id": "ok", "text": "fine"}) + "\n" +
                 json.dumps({"id": "odd", "content": [{"text": "x"}, {"image": path}]}) + "\n")
    loader = PackingLoader(RecordSet(f), MocaProcessor.tiny(56), 512, shuffle=False, max_samples=1)
    with pytest.raises(BadRecord, match=rf"record odd \(t.jsonl:2\): image .*{says}"):   # was an OSError traceback
        loader.next_micro_batch()
    loader = PackingLoader(RecordSet(f), MocaProcessor.tiny(56), 512, shuffle=False, max_samples=1, skip_bad=True)
    assert [s.record_id for s in loader.next_micro_batch()] == ["ok (t.jsonl:1)"]
    assert dict(loader.skipped) == {"missing_image": 1}
