"""The demo's embedded world: scenes and the words for them, split so that Stage 1 has something to teach.

The world is the scenes of :mod:`moca.data.embedded` (one or two shapes: 8 colours x 5 shapes, 2 sizes,
2 backgrounds, 2 relations) and their compositional captions. Its colour-shape **compositions** are split in
two halves (:func:`labeled_compositions`): every colour and every shape occurs in both halves, but a given
(colour, shape) pair is in one only.

* **Unlabeled interleaved corpus** (Stage 1, :func:`write_world_corpus`): documents of 2 to 4 scenes, each
  image next to its caption (before or after it, in one of a few phrasings), drawn from the whole world. The
  first ``n`` documents of a larger corpus are the smaller corpus (the amounts are nested).
* **Labeled pairs** (Stage 2, :func:`write_world_pairs`): a small set of caption -> image and image -> caption
  pairs, each with near-miss hard negatives, in which every object has a *labeled* composition.
* **Held-out tasks** (:func:`write_world_tasks`): queries whose every object has a *held-out* composition
  (absent from all labeled pairs, positives and negatives alike): ``world_t2i`` (a caption against 8 images:
  the scene and 7 other scenes of the world), ``world_i2t`` (an image against 8 captions) and ``world_search``
  ("a purple circle" against a corpus of scene images; relevant: the images that contain one). (Near-miss
  candidates, one attribute changed, left every arm of the tiny model near chance: nothing to compare.)

Three independent seed streams draw the corpus, the pairs and the tasks: no held-out query, candidate list or
image is in the corpus or the pairs; what they share is the world (its vocabulary and how it is drawn). The
same seed gives byte-identical files; every JSONL is written atomically.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from ..fsutil import atomic_save_image, atomic_write_text
from .embedded import COLORS, SHAPES, Scene, caption, draw_scene, random_scene
from .embedded_retrieval import _Images, perturb, write_jsonl

Composition = Tuple[str, str]   # (colour, shape)

INSTRUCTIONS = {
    "world_t2i": ("Find an image that matches the given caption: ", ""),
    "world_i2t": ("Find a caption for the given image: ", ""),
    "world_search": ("Find images that contain: ", ""),
}
TEMPLATES = ("Figure: {}.", "In this picture: {}.", "The drawing shows {}.", "{}.")


def labeled_compositions() -> FrozenSet[Composition]:
    """The half of the (colour, shape) pairs that labeled data may use: colour i with shape j when i + j is even.

    Every colour has 2 or 3 labeled and 2 or 3 held-out shapes, every shape 4 labeled and 4 held-out colours."""
    return frozenset((c, s) for i, c in enumerate(COLORS) for j, s in enumerate(SHAPES) if (i + j) % 2 == 0)


def compositions(scene: Scene) -> Set[Composition]:
    """The (colour, shape) pairs of a scene's objects."""
    return {(t.color, t.shape) for t in scene.things}


def _scene_in(rng: random.Random, allowed: FrozenSet[Composition]) -> Scene:
    """A random scene whose every object has a composition in ``allowed``."""
    for _ in range(1000):
        sc = random_scene(rng)
        if compositions(sc) <= allowed:
            return sc
    raise RuntimeError("no scene with the allowed compositions")


def _near_misses(scene: Scene, k: int, rng: random.Random, allowed: Optional[FrozenSet[Composition]]) -> List[Scene]:
    """``k`` distinct near misses of ``scene`` (one attribute changed), all inside ``allowed`` when given."""
    out, seen = [], {caption(scene)}
    for _ in range(k):
        for _ in range(200):
            s, _ = perturb(scene, rng, seen)
            if allowed is None or compositions(s) <= allowed:
                break
        else:
            raise RuntimeError(f"no near miss of {caption(scene)!r} inside the allowed compositions")
        seen.add(caption(s))
        out.append(s)
    return out


def _distractors(scene: Scene, k: int, rng: random.Random) -> List[Scene]:
    """``k`` random scenes of the whole world, their captions distinct from each other and from ``scene``'s."""
    out, seen = [], {caption(scene)}
    while len(out) < k:
        s = random_scene(rng)
        if caption(s) not in seen:
            seen.add(caption(s))
            out.append(s)
    return out


def write_world_corpus(out_dir, amounts: Sequence[int], seed: int = 0, image_size: int = 56,
                       min_scenes: int = 2, max_scenes: int = 4) -> Dict[int, Path]:
    """Write the unlabeled interleaved corpus: ``out_dir/world_<n>.jsonl`` for every ``n`` in ``amounts`` (the
    first ``n`` documents of the largest) plus PNG images in ``out_dir/images``; returns {n: JSONL path}.

    Each record is ``{"id": ..., "content": [{"image": ...}, {"text": "Figure: a large red circle ..."}, ...]}``
    with ``min_scenes`` to ``max_scenes`` scenes of the whole world.
    """
    if not amounts or min(amounts) < 1:
        raise ValueError(f"amounts must be document counts >= 1, got {list(amounts)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"world-corpus/{seed}")
    lines = []
    for i in range(max(amounts)):
        content = []
        for j in range(rng.randint(min_scenes, max_scenes)):
            sc = random_scene(rng)
            name = f"images/w{i:05d}_{j}.png"
            atomic_save_image(draw_scene(sc, image_size), out / name, optimize=False, compress_level=6)
            text = {"text": rng.choice(TEMPLATES).format(caption(sc))}
            content += [{"image": name}, text] if rng.random() < 0.5 else [text, {"image": name}]
        lines.append(json.dumps({"id": f"world{i:05d}", "content": content}))
    paths = {}
    for n in sorted(set(amounts)):
        paths[n] = atomic_write_text(out / f"world_{n}.jsonl", "\n".join(lines[:n]) + "\n")
    return paths


def write_world_pairs(out_dir, n_pairs: int = 64, hard_negatives: int = 1, seed: int = 0,
                      image_size: int = 56) -> List[dict]:
    """Write the labeled Stage 2 pairs (``world_t2i`` and ``world_i2t``, ``n_pairs`` each, ``hard_negatives``
    near misses each), every object of every positive and negative in :func:`labeled_compositions`; returns
    the subset configs (dicts for :class:`~moca.data.retrieval.SubsetConfig`)."""
    out = Path(out_dir)
    images = _Images(out, image_size)
    rng = random.Random(f"world-pairs/{seed}")
    allowed = labeled_compositions()
    t2i, i2t = [], []
    for i in range(n_pairs):
        sc = _scene_in(rng, allowed)
        negs = _near_misses(sc, hard_negatives, rng, allowed)
        t2i.append({"id": f"t2i{i:05d}", "query": {"text": caption(sc)}, "positive": {"image": images(sc)},
                    "negatives": [{"image": images(n)} for n in negs]})
        sc = _scene_in(rng, allowed)
        negs = _near_misses(sc, hard_negatives, rng, allowed)
        i2t.append({"id": f"i2t{i:05d}", "query": {"image": images(sc)}, "positive": {"text": caption(sc)},
                    "negatives": [{"text": caption(n)} for n in negs]})
    configs = []
    for name, records in (("world_t2i", t2i), ("world_i2t", i2t)):
        path = write_jsonl(out / f"{name}.jsonl", records)
        q, d = INSTRUCTIONS[name]
        configs.append({"name": name, "files": [str(path)], "weight": 1.0, "query_instruction": q,
                        "doc_instruction": d})
    return configs


def write_world_tasks(out_dir, n_queries: int = 100, n_candidates: int = 8, corpus_size: int = 120, seed: int = 0,
                      image_size: int = 56, queries_in: str = "held_out") -> List[dict]:
    """Write the held-out tasks (every query's objects in held-out compositions); returns their task configs
    (dicts for :class:`~moca.eval.EvalTask`). ``queries_in="labeled"`` writes the same tasks over the labeled
    compositions instead (a diagnostic: how well the labeled compositions themselves are learned)."""
    if queries_in not in ("held_out", "labeled"):
        raise ValueError(f"queries_in must be 'held_out' or 'labeled', got {queries_in!r}")
    out = Path(out_dir)
    images = _Images(out, image_size)
    rng = random.Random(f"world-tasks/{seed}")
    held_out = frozenset((c, s) for c in COLORS for s in SHAPES) - labeled_compositions()
    if queries_in == "labeled":
        held_out = labeled_compositions()
    tasks = []
    t2i, i2t = [], []
    for i in range(n_queries):
        for records, side in ((t2i, "t2i"), (i2t, "i2t")):
            sc = _scene_in(rng, held_out)
            cands = [sc] + _distractors(sc, n_candidates - 1, rng)
            gold = rng.randrange(n_candidates)
            cands[0], cands[gold] = cands[gold], cands[0]
            if side == "t2i":
                records.append({"id": f"t2i{i:04d}", "query": {"text": caption(sc)},
                                "candidates": [{"image": images(c)} for c in cands], "answer": gold})
            else:
                records.append({"id": f"i2t{i:04d}", "query": {"image": images(sc)},
                                "candidates": [{"text": caption(c)} for c in cands], "answer": gold})
    for name, records in (("world_t2i", t2i), ("world_i2t", i2t)):
        path = write_jsonl(out / f"{name}.jsonl", records)
        q, d = INSTRUCTIONS[name]
        tasks.append({"name": name, "type": "candidates", "file": str(path), "query_instruction": q,
                      "doc_instruction": d})
    corpus, contains = [], []
    for i in range(corpus_size):
        sc = random_scene(rng)
        corpus.append({"id": f"img{i:04d}", "doc": {"image": images(sc)}})
        contains.append(compositions(sc))
    hits: Dict[Composition, List[str]] = {}
    for doc, objs in zip(corpus, contains):
        for o in objs & held_out:
            hits.setdefault(o, []).append(doc["id"])
    queries = [{"id": f"q{i:04d}", "query": {"text": f"a {c} {s}"}, "relevant": {d: 1 for d in docs}}
               for i, ((c, s), docs) in enumerate(sorted(hits.items()))]
    q_path = write_jsonl(out / "world_search_queries.jsonl", queries)
    c_path = write_jsonl(out / "world_search_corpus.jsonl", corpus)
    q, d = INSTRUCTIONS["world_search"]
    tasks.append({"name": "world_search", "type": "retrieval", "queries": str(q_path), "corpus": str(c_path),
                  "query_instruction": q, "doc_instruction": d})
    return tasks
