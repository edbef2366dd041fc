"""The published layouts (MMEB-eval parquet, ViDoRe BEIR parquet) read as published and evaluated end to end
with the tiny model; run files re-score to the reported numbers with pytrec_eval; the paper-style tables."""

import json
import math

import pytest
import torch

from moca.data.published import EncodedImage, literal_list, placeholder_side, read_beir, read_mmeb_task
from moca.eval import EvalConfig, EvalTask, evaluate, paper_tables, set_image_bounds
from moca.eval.metrics import read_trec_run
from moca.eval.mmeb_tasks import MMEB_TASKS

from .published_fixtures import write_beir, write_mmeb


def test_mmeb_reader_keeps_gold_first_and_places_the_image_at_its_token(tmp_path):
    tasks, img_root = write_mmeb(tmp_path, n_queries=3, n_cands=3)
    recs = read_mmeb_task(tasks["ImageNet-1K"], img_root)
    assert len(recs) == 3 and all(r.gold == 0 and len(r.candidates) == 3 for r in recs)
    q = recs[0].query["content"]
    assert q[0] == {"image": str(img_root / "ImageNet-1K/0.png")}
    assert q[1]["text"].startswith(" Represent the given image for classification.")
    assert recs[0].candidates[0] == "red"                          # the label of image 0, first
    t2i = read_mmeb_task(tasks["MSCOCO_t2i"], img_root)
    assert isinstance(t2i[0].query, str) and t2i[0].query.startswith("Find me an everyday image")
    assert t2i[0].candidates[1]["content"][0] == {"image": str(img_root / "MSCOCO_t2i/0_1.png")}
    # lists stored as Python-literal strings read the same
    lit, _ = write_mmeb(tmp_path / "lit", n_queries=3, n_cands=3, literal_lists=True)
    assert [r.candidates for r in read_mmeb_task(lit["ImageNet-1K"], tmp_path / "lit" / "images")] == \
        [r.candidates for r in recs]


def test_placeholders_and_literal_lists_errors():
    assert placeholder_side("a <|image_1|> b", ["x.png"], "<|image_1|>", "w") == \
        {"content": [{"text": "a "}, {"image": "x.png"}, {"text": " b"}]}
    assert placeholder_side("caption", ["x.png"], "<|image_1|>", "w") == \
        {"content": [{"image": "x.png"}, {"text": "caption"}]}        # no token: the image goes first
    assert placeholder_side("", ["x.png"], "<|image_1|>", "w") == {"image": "x.png"}
    with pytest.raises(ValueError, match="w: the text has 2 image placeholder"):
        placeholder_side("<|image_1|> <|image_1|>", ["x.png"], "<|image_1|>", "w")
    assert literal_list("['a', \"b\"]", "w") == ["a", "b"]
    with pytest.raises(ValueError, match="cannot parse the list literal"):
        literal_list("[__import__('os').system('echo hi')]", "r3 tgt_text")


def test_beir_reader_lazy_images_and_language_filter(tmp_path):
    folder = write_beir(tmp_path / "vidore")
    bt = read_beir(folder)
    assert len(bt.doc_ids) == 8 and len(bt.query_ids) == 6
    assert isinstance(bt.docs[0]["image"], EncodedImage)
    assert bt.docs[0]["image"].decode().size == (36, 48)
    assert not list(tmp_path.rglob("*.png"))                           # nothing written out
    assert bt.languages == {"french": 2, "english": 4}
    fr = read_beir(folder, language="french")
    assert fr.query_ids == ["0", "3"] and fr.qrels["3"] == {"3": 1.0, "1": 2.0}
    with pytest.raises(ValueError, match=r"no query in language \['german'\]"):
        read_beir(folder, language=["german"])
    raw = write_beir(tmp_path / "raw", struct_images=False, split_files=False)
    assert read_beir(raw).docs[3]["image"].decode().size == (36, 48)
    with pytest.raises(FileNotFoundError, match="no 'corpus' folder"):
        read_beir(tmp_path / "raw" / "corpus")


def test_mmeb_task_registry_is_the_36_tasks():
    assert len(MMEB_TASKS) == 36
    cats = [v["category"] for v in MMEB_TASKS.values()]
    assert [cats.count(c) for c in ("classification", "vqa", "retrieval", "grounding")] == [10, 10, 12, 4]
    assert sum(v["split"] == "IND" for v in MMEB_TASKS.values()) == 20
    assert EvalTask(name="imagenet-1k", type="mmeb", path=".").category == "classification"


@pytest.fixture(scope="module")
def tiny():
    from moca.embedding import MocaEmbedder

    torch.manual_seed(0)
    return MocaEmbedder.tiny(seed=0, image_size=56)


def test_end_to_end_on_published_fixtures_with_the_tiny_model(tmp_path, tiny):
    pytrec_eval = pytest.importorskip("pytrec_eval")
    mm, img_root = write_mmeb(tmp_path / "mmeb")
    vid = write_beir(tmp_path / "vidore")
    tasks = [EvalTask(name=n, type="mmeb", path=str(p), image_root=str(img_root)) for n, p in mm.items()]
    tasks.append(EvalTask(name="vidore_fixture", type="beir", path=str(vid), doc_instruction="Represent the page."))
    cfg = EvalConfig(recall_k=[1, 5], ndcg_k=5, show_progress=False, batch_size=16)
    res = evaluate(tiny, tasks, cfg, run_dir=tmp_path / "out")
    t = res["tasks"]
    assert t["ImageNet-1K"]["category"] == "classification" and t["MSCOCO_t2i"]["category"] == "retrieval"
    for name in ("ImageNet-1K", "MSCOCO_t2i"):
        assert 0.0 <= t[name]["metrics"]["precision@1"] <= 1.0 and t[name]["n_queries"] == 6
    # the run file re-scores to the reported numbers
    bt = read_beir(vid)
    run = read_trec_run(tmp_path / "out" / "vidore_fixture.run")
    qrels = {q: {d: int(g) for d, g in r.items()} for q, r in bt.qrels.items()}
    per = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5", "recall.1", "recall.5"}).evaluate(run)
    for ours, theirs in (("ndcg@5", "ndcg_cut_5"), ("recall@1", "recall_1"), ("recall@5", "recall_5")):
        ref = sum(v[theirs] for v in per.values()) / len(per)
        assert t["vidore_fixture"]["metrics"][ours] == pytest.approx(ref, abs=1e-12)
    mmeb = res["summary"]["mmeb"]
    assert mmeb["IND"]["n_tasks"] == 2 and mmeb["OOD"] is None
    assert mmeb["overall"]["score"] == pytest.approx(
        (t["ImageNet-1K"]["metrics"]["precision@1"] + t["MSCOCO_t2i"]["metrics"]["precision@1"]) / 2)
    table = paper_tables(res, "tiny")
    assert "| Model | Classification (1) | VQA (0) | Retrieval (1) | Grounding (0) | IND (2) | OOD (0) | Overall (2) |" \
        in table.replace("  ", " ").replace("  ", " ")
    assert "vidore_fixture" in table and "Avg" in table
    print("\n" + table)


class _Recorder:
    """Records the items it is asked to embed; embeds a text by its length, an image by a constant."""

    def __init__(self):
        self.items = []

    def encode_items(self, items, **_):
        self.items += items
        return torch.nn.functional.normalize(torch.rand(len(items), 4, generator=torch.Generator().manual_seed(0)),
                                             dim=-1)


def test_vidore_document_prompt_goes_after_the_image(tmp_path):
    vid = write_beir(tmp_path / "v", n_docs=3, n_queries=2)
    rec = _Recorder()
    evaluate(rec, [EvalTask(name="v", type="beir", path=str(vid), doc_instruction="Represent this page.",
                            query_instruction="Q: ")], EvalConfig(show_progress=False))
    docs = [side for side, name, ins in rec.items if name.startswith("v: corpus-id")]
    assert docs and all(d["content"][-1] == {"text": "Represent this page."} and "image" in d["content"][0]
                        for d in docs)
    queries = [(side, ins) for side, name, ins in rec.items if name.startswith("v: query-id")]
    assert queries and all(ins == "Q: " for _, ins in queries)
    rec = _Recorder()
    evaluate(rec, [EvalTask(name="v", type="beir", path=str(vid), doc_instruction="P.",
                            doc_instruction_position="before")], EvalConfig(show_progress=False))
    assert all(ins == "P." for side, name, ins in rec.items if name.startswith("v: corpus-id"))


def test_image_bounds_in_eval(tiny):
    from PIL import Image

    from moca.data.retrieval import build_sample

    img = Image.new("RGB", (300, 200), (10, 200, 30))
    spec = tiny.processor.image_spec
    old = (spec.min_pixels, spec.max_pixels)
    try:
        set_image_bounds(tiny, 256 * 28 * 28, 1024 * 28 * 28)     # the paper's 256..1024 merged tokens
        n = int((build_sample(tiny.processor, {"image": img}, "x").input_ids == tiny.processor.ids["image_pad"]).sum())
        assert 256 <= n <= 1024
        with pytest.raises(ValueError, match="min_pixels .* is above max_pixels"):
            set_image_bounds(tiny, 10 ** 7, None)
    finally:
        spec.min_pixels, spec.max_pixels = old
    with pytest.raises(ValueError, match="min_pixels 9 is above max_pixels 4"):
        EvalConfig(min_pixels=9, max_pixels=4)


def test_moca_data_inspect(tmp_path, capsys):
    from moca.cli import main

    from .published_fixtures import write_pairs, write_pretrain

    mm, img_root = write_mmeb(tmp_path / "mmeb", n_queries=3, n_cands=3)
    assert main(["data", "inspect", str(mm["ImageNet-1K"]), "--image-root", str(img_root)]) == 0
    out = capsys.readouterr().out
    assert "format mmeb, 3 records" in out and "problems: none found" in out and "record 0:" in out
    assert main(["data", "inspect", str(mm["ImageNet-1K"])]) == 1          # wrong image root: images missing
    assert "does not exist" in capsys.readouterr().out
    assert main(["data", "inspect", str(write_beir(tmp_path / "v"))]) == 0
    assert "format beir, 6 records" in capsys.readouterr().out
    pairs = write_pairs(tmp_path / "p.parquet", tmp_path / "img", n=3)
    assert main(["data", "inspect", str(pairs), "--image-root", str(tmp_path / "img")]) == 0
    assert "format pairs, 3 records" in capsys.readouterr().out
    assert main(["data", "inspect", str(write_pretrain(tmp_path / "pt.parquet", n=2))]) == 0
    out = capsys.readouterr().out
    assert "format moca_pretrain, 2 records" in out and "images: 4" in out
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "candidates": ["a"], "answer": 0}\n{oops\n')
    assert main(["data", "inspect", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "nowhere")]) == 2


def test_moca_eval_command_writes_run_files_next_to_results_and_prints_the_paper_tables(tmp_path, capsys):
    import yaml

    from moca.cli import main

    mm, img_root = write_mmeb(tmp_path / "mmeb", n_queries=3, n_cands=3)
    vid = write_beir(tmp_path / "vidore", n_docs=4, n_queries=3)
    cfg = {"tasks": [{"name": "ImageNet-1K", "type": "mmeb", "path": str(mm["ImageNet-1K"]),
                      "image_root": str(img_root)},
                     {"name": "vid", "type": "beir", "path": str(vid), "language": ["english"]}],
           "output": str(tmp_path / "out" / "results.json"), "show_progress": False, "recall_k": [1]}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", "--config", str(tmp_path / "e.yaml")]) == 0
    out = capsys.readouterr().out
    assert "MMEB (precision@1, %)" in out and "| vid " in out
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    run = (tmp_path / "out" / "vid.run").read_text().splitlines()
    assert res["tasks"]["vid"]["run_file"] == str(tmp_path / "out" / "vid.run")
    assert {line.split()[0] for line in run} == {"1", "2"}                   # english queries only
    assert res["summary"]["mmeb"]["categories"]["classification"]["n_tasks"] == 1


def test_inspect_checks_only_the_first_records_of_a_large_set(tmp_path, capsys):
    from moca.cli import main

    from .published_fixtures import write_pretrain

    f = write_pretrain(tmp_path / "pt.parquet", n=5)
    assert main(["data", "inspect", str(f), "--check", "2"]) == 0
    out = capsys.readouterr().out
    assert "format moca_pretrain, 5 records (2 checked)" in out and "images: 4" in out
