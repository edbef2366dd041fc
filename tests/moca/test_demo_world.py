"""The demo's embedded world (:mod:`moca.data.embedded_world`): deterministic, nested corpus amounts, labeled
pairs only in the labeled compositions, held-out queries only in the others."""

import hashlib
import json
import re
from pathlib import Path

import pytest

from moca.data.embedded import COLORS, SHAPES
from moca.data.embedded_world import (labeled_compositions, write_world_corpus, write_world_pairs,
                                      write_world_tasks)
from tests.helpers import tree_digest

OBJECT = re.compile(r"\b(?:(?:small|large) )?(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")\b")


def _objects(text: str) -> set:
    found = set(OBJECT.findall(text))
    assert found, f"no object in {text!r}"
    return found


def _records(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _image_digests(jsonl: Path) -> set:
    out = set()
    for r in _records(jsonl):
        for item in json.dumps(r).split('"image": "')[1:]:
            out.add(hashlib.sha256((jsonl.parent / item.split('"')[0]).read_bytes()).hexdigest())
    return out


def _write(root: Path, seed: int = 0):
    corpus = write_world_corpus(root / "c", [5, 20], seed=seed, image_size=28)
    pairs = write_world_pairs(root / "p", n_pairs=12, hard_negatives=2, seed=seed, image_size=28)
    tasks = write_world_tasks(root / "t", n_queries=10, n_candidates=6, corpus_size=30, seed=seed, image_size=28)
    return corpus, pairs, tasks


_digest = tree_digest


def test_compositions_split_every_colour_and_shape_into_both_halves():
    labeled = labeled_compositions()
    every = {(c, s) for c in COLORS for s in SHAPES}
    assert labeled < every and len(labeled) == len(every) // 2
    for c in COLORS:
        assert 0 < sum((c, s) in labeled for s in SHAPES) < len(SHAPES)
    for s in SHAPES:
        assert 0 < sum((c, s) in labeled for c in COLORS) < len(COLORS)


def test_world_is_deterministic_and_seeded(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    _write(tmp_path / "c", seed=1)
    pairs = [(tmp_path / d / "p" / "world_t2i.jsonl").read_text() for d in ("a", "c")]
    assert pairs[0] != pairs[1]


def test_labeled_pairs_and_held_out_tasks_use_disjoint_compositions(tmp_path):
    corpus, pairs, tasks = _write(tmp_path)
    labeled = labeled_compositions()
    # every object of every labeled query, positive and negative is in the labeled half
    for sub in pairs:
        recs = _records(sub["files"][0])
        assert len(recs) == 12
        for r in recs:
            assert len(r["negatives"]) == 2
            for side in [r["query"], r["positive"]] + r["negatives"]:
                if "text" in side:
                    assert _objects(side["text"]) <= labeled
    # the image sides: the t2i positives are the images of labeled captions (checked through the i2t side's
    # captions above); the held-out queries are all outside the labeled half
    t2i, i2t, search = tasks
    assert [t["name"] for t in tasks] == ["world_t2i", "world_i2t", "world_search"]
    for r in _records(t2i["file"]):
        assert not _objects(r["query"]["text"]) & labeled and len(r["candidates"]) == 6
    for r in _records(i2t["file"]):
        gold = r["candidates"][r["answer"]]["text"]
        assert not _objects(gold) & labeled
        assert len({c["text"] for c in r["candidates"]}) == 6      # distinct near misses
    queries = _records(search["queries"])
    assert queries
    for q in queries:
        assert not _objects(q["query"]["text"]) & labeled and q["relevant"]
    # corpus amounts are nested: the small corpus is the first documents of the large one
    small, large = corpus[5].read_text().splitlines(), corpus[20].read_text().splitlines()
    assert len(small) == 5 and len(large) == 20 and large[:5] == small
    for r in _records(corpus[20]):
        kinds = [next(iter(item)) for item in r["content"]]
        assert kinds.count("image") == kinds.count("text") >= 2
    # the corpus is drawn from its own seed stream: writing the tasks and pairs does not change it (what it
    # shares with the tasks is the world; a tiny image can still render the same by chance)
    again = write_world_corpus(tmp_path / "c2", [20], seed=0, image_size=28)[20]
    assert again.read_text() == corpus[20].read_text() and _image_digests(again) == _image_digests(corpus[20])
    # labeled image sides: every image positive of t2i is a labeled scene (its query caption is labeled)
    for r in _records(pairs[0]["files"][0]):
        assert _objects(r["query"]["text"]) <= labeled


def test_labeled_diagnostic_tasks_query_the_labeled_half(tmp_path):
    labeled = labeled_compositions()
    t2i, i2t, search = write_world_tasks(tmp_path, n_queries=6, n_candidates=4, corpus_size=20, seed=3,
                                         image_size=28, queries_in="labeled")
    assert all(_objects(r["query"]["text"]) <= labeled for r in _records(t2i["file"]))
    assert all(_objects(q["query"]["text"]) <= labeled for q in _records(search["queries"]))


def test_bad_amounts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="amounts"):
        write_world_corpus(tmp_path, [0, 4])
    with pytest.raises(ValueError, match="queries_in"):
        write_world_tasks(tmp_path, queries_in="seen")
