"""Embedded Stage 2 and evaluation data: retrieval pairs with hard negatives and held-out tasks, no download.

Built from the same pieces as the Stage 1 corpus (:mod:`moca.data.embedded`): procedurally drawn scenes with
compositional captions, and passages of Python's bundled documentation. The same seed gives byte-identical
files.

**Training subsets** (Stage 2, :func:`write_train_subsets`), each a JSONL of pair records with ``k`` hard
negatives that differ from the positive in one attribute (a colour, a shape, a size, the relation, the
background), so that only a model that reads the whole input can tell them apart:

=================== ========================== ================================ ===========================
subset              query                      positive                         hard negatives
=================== ========================== ================================ ===========================
``scene_t2i``       caption (text)             the scene's image                images of near-miss scenes
``scene_i2t``       image                      its caption                      near-miss captions
``scene_edit``      image + "make the X Y"     image of the edited scene        the unedited image, other edits
``passage_next``    a passage's first words    the rest of the passage          continuations of passages of the same topic
=================== ========================== ================================ ===========================

**Held-out evaluation tasks** (:func:`write_eval_tasks`): fresh scenes drawn from another seed stream, and
passages of documentation topics that training never sees.

* MMEB style (precision@1 over a candidate list): ``scene_t2i`` (a caption against 8 images: the scene and
  7 near misses), ``scene_i2t`` (an image against 8 captions), ``scene_vqa`` (a task type absent from
  training: an image and "What color is the <shape>?" against the 8 colour names).
* ViDoRe style (Recall@k and nDCG@5 over a corpus): ``scene_search`` (partial descriptions such as "a red
  circle", a task type absent from training, against a corpus of scene images; every image that contains
  such an object is relevant), ``passage_search`` (the first words of a held-out passage against the
  continuations of all held-out passages).
"""

from __future__ import annotations

import copy
import random
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .embedded import COLORS, RELATIONS, SHAPES, SIZES, BACKGROUNDS, Scene, caption, draw_scene, passages, random_scene
from ..fsutil import atomic_save_image, atomic_write_text


def write_jsonl(path, records) -> Path:
    """Write records as JSON lines, atomically (a temporary renamed into place)."""
    import json

    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))

INSTRUCTIONS = {
    "scene_t2i": ("Find an image that matches the given caption: ", ""),
    "scene_i2t": ("Find a caption for the given image: ", ""),
    "scene_edit": ("Find the image after the change: ", ""),
    "passage_next": ("Find the continuation of this passage: ", ""),
    "scene_vqa": ("Answer the question about the image: ", ""),
    "scene_search": ("Find images that contain: ", ""),
    "passage_search": ("Find the continuation of this passage: ", ""),
}
QUERY_WORDS = 10          # a passage query is its first words; the positive is the rest
EVAL_TOPIC_EVERY = 5      # one documentation topic in 5 (by a stable hash of its title) is held out for evaluation


class _Images:
    """Writes each distinct scene once (named by a hash of its spec) and returns its relative path."""

    def __init__(self, root: Path, size: int):
        self.root, self.size, self.seen = root, size, {}
        (root / "images").mkdir(parents=True, exist_ok=True)

    def __call__(self, scene: Scene) -> str:
        key = f"{caption(scene)}|{scene.jitter[0]:.4f}|{scene.jitter[1]:.4f}"
        if key not in self.seen:
            name = f"images/s{zlib.crc32(key.encode()):08x}.png"
            atomic_save_image(draw_scene(scene, self.size), self.root / name, optimize=False, compress_level=6)
            self.seen[key] = name
        return self.seen[key]


def perturb(scene: Scene, rng: random.Random, avoid: Optional[set] = None) -> Tuple[Scene, str]:
    """A near-miss copy of ``scene`` with one attribute changed, whose caption is not in ``avoid``.

    Returns (new scene, what changed: color | shape | size | relation | order | background).
    """
    avoid = set(avoid or ()) | {caption(scene)}
    for _ in range(100):
        s = copy.deepcopy(scene)
        kinds = ["color", "shape", "size", "background"] + (["relation", "order"] if len(s.things) == 2 else [])
        kind = rng.choice(kinds)
        t = rng.choice(s.things)
        if kind == "color":
            t.color = rng.choice([c for c in COLORS if c != t.color])
        elif kind == "shape":
            t.shape = rng.choice([x for x in SHAPES if x != t.shape])
        elif kind == "size":
            t.size = rng.choice([x for x in SIZES if x != t.size])
        elif kind == "background":
            s.background = rng.choice([b for b in BACKGROUNDS if b != s.background])
        elif kind == "relation":
            s.relation = rng.choice([r for r in RELATIONS if r != s.relation])
        else:
            s.things = s.things[::-1]
        if len(s.things) == 2 and (s.things[0].shape, s.things[0].color) == (s.things[1].shape, s.things[1].color):
            continue
        if caption(s) not in avoid:
            return s, kind
    raise RuntimeError(f"could not perturb {caption(scene)!r}")


def near_misses(scene: Scene, k: int, rng: random.Random) -> List[Scene]:
    out, seen = [], {caption(scene)}
    for _ in range(k):
        s, _ = perturb(scene, rng, seen)
        seen.add(caption(s))
        out.append(s)
    return out


def _split_passages(split: str) -> List[Tuple[str, str, str]]:
    """(title, first words, rest) of the passages of the training or the held-out topics."""
    out = []
    for title, text in passages(max_words=40):
        held_out = zlib.crc32(title.encode()) % EVAL_TOPIC_EVERY == 0
        if held_out != (split == "eval"):
            continue
        words = text.split()
        if len(words) >= QUERY_WORDS + 12:
            out.append((title, f"{title}: " + " ".join(words[:QUERY_WORDS]), " ".join(words[QUERY_WORDS:])))
    return out


def _edit(scene: Scene, rng: random.Random, avoid: set) -> Tuple[Scene, str]:
    """A colour or shape edit of one object, and its instruction text ("make the red circle blue")."""
    for _ in range(100):
        s = copy.deepcopy(scene)
        i = rng.randrange(len(s.things))
        t = s.things[i]
        before = f"the {t.color} {t.shape}"
        if rng.random() < 0.5:
            t.color = rng.choice([c for c in COLORS if c != t.color])
            text = f"make {before} {t.color}"
        else:
            t.shape = rng.choice([x for x in SHAPES if x != t.shape])
            text = f"turn {before} into a {t.shape}"
        dup = len(s.things) == 2 and (s.things[0].shape, s.things[0].color) == (s.things[1].shape, s.things[1].color)
        if not dup and caption(s) not in avoid:
            return s, text
    raise RuntimeError(f"could not edit {caption(scene)!r}")


def write_train_subsets(out_dir, n_per_subset: int = 256, hard_negatives: int = 2, seed: int = 0,
                        image_size: int = 112) -> List[dict]:
    """Write the four training subsets under ``out_dir`` (JSONL + images); returns their subset configs
    (dicts for :class:`~moca.data.retrieval.SubsetConfig`, with the instruction templates, weight 1)."""
    out = Path(out_dir)
    images = _Images(out, image_size)
    rng = random.Random(f"train/{seed}")
    k = hard_negatives
    subsets: Dict[str, List[dict]] = {"scene_t2i": [], "scene_i2t": [], "scene_edit": [], "passage_next": []}
    for i in range(n_per_subset):
        sc = random_scene(rng)
        negs = near_misses(sc, k, rng)
        subsets["scene_t2i"].append({"id": f"t2i{i:05d}", "query": {"text": caption(sc)},
                                     "positive": {"image": images(sc)},
                                     "negatives": [{"image": images(n)} for n in negs]})
        sc = random_scene(rng)
        negs = near_misses(sc, k, rng)
        subsets["scene_i2t"].append({"id": f"i2t{i:05d}", "query": {"image": images(sc)},
                                     "positive": {"text": caption(sc)},
                                     "negatives": [{"text": caption(n)} for n in negs]})
        sc = random_scene(rng)
        edited, text = _edit(sc, rng, {caption(sc)})
        others = [sc] + [_edit(sc, rng, {caption(sc), caption(edited)})[0] for _ in range(max(k - 1, 0))]
        subsets["scene_edit"].append({"id": f"edit{i:05d}",
                                      "query": {"content": [{"image": images(sc)}, {"text": text}]},
                                      "positive": {"image": images(edited)},
                                      "negatives": [{"image": images(n)} for n in others[:k]]})
    pool = _split_passages("train")
    by_title: Dict[str, List[int]] = {}
    for j, (title, _, _) in enumerate(pool):
        by_title.setdefault(title, []).append(j)
    order = list(range(len(pool)))
    rng.shuffle(order)
    for i in range(min(n_per_subset, len(pool))):
        j = order[i]
        title, head, rest = pool[j]
        same = [x for x in by_title[title] if x != j]
        others = rng.sample(same, min(k, len(same)))
        others += rng.sample([x for x in range(len(pool)) if x != j and x not in others], k - len(others))
        subsets["passage_next"].append({"id": f"passage{i:05d}", "query": {"text": head},
                                        "positive": {"text": rest},
                                        "negatives": [{"text": pool[x][2]} for x in others]})
    configs = []
    for name, records in subsets.items():
        path = write_jsonl(out / f"{name}.jsonl", records)
        q, d = INSTRUCTIONS[name]
        configs.append({"name": name, "files": [str(path)], "weight": 1.0, "query_instruction": q,
                        "doc_instruction": d})
    return configs


def write_eval_tasks(out_dir, n_queries: int = 80, n_candidates: int = 8, corpus_size: int = 160, seed: int = 0,
                     image_size: int = 112) -> List[dict]:
    """Write the held-out evaluation tasks under ``out_dir``; returns their task configs (dicts for
    :class:`~moca.eval.EvalTask`)."""
    out = Path(out_dir)
    images = _Images(out, image_size)
    rng = random.Random(f"eval/{seed}")
    tasks = []

    def candidates_task(name: str, records: List[dict]) -> None:
        path = write_jsonl(out / f"{name}.jsonl", records)
        q, d = INSTRUCTIONS[name]
        tasks.append({"name": name, "type": "candidates", "file": str(path), "query_instruction": q,
                      "doc_instruction": d})

    t2i, i2t, vqa = [], [], []
    for i in range(n_queries):
        sc = random_scene(rng)
        cands = [sc] + near_misses(sc, n_candidates - 1, rng)
        gold = rng.randrange(n_candidates)
        cands[0], cands[gold] = cands[gold], cands[0]
        t2i.append({"id": f"t2i{i:04d}", "query": {"text": caption(sc)},
                    "candidates": [{"image": images(c)} for c in cands], "answer": gold})
        sc = random_scene(rng)
        cands = [sc] + near_misses(sc, n_candidates - 1, rng)
        gold = rng.randrange(n_candidates)
        cands[0], cands[gold] = cands[gold], cands[0]
        i2t.append({"id": f"i2t{i:04d}", "query": {"image": images(sc)},
                    "candidates": [{"text": caption(c)} for c in cands], "answer": gold})
        sc = random_scene(rng)
        t = rng.choice(sc.things)
        colors = list(COLORS)
        vqa.append({"id": f"vqa{i:04d}",
                    "query": {"content": [{"image": images(sc)}, {"text": f"What color is the {t.shape}?"}]},
                    "candidates": [{"text": c} for c in colors], "answer": colors.index(t.color)})
        if len(sc.things) == 2 and sc.things[0].shape == sc.things[1].shape:
            vqa.pop()   # ambiguous question: two objects of that shape
    candidates_task("scene_t2i", t2i)
    candidates_task("scene_i2t", i2t)
    candidates_task("scene_vqa", vqa)

    # scene search: partial descriptions against a corpus of images
    corpus, contains = [], []
    for i in range(corpus_size):
        sc = random_scene(rng)
        corpus.append({"id": f"img{i:04d}", "doc": {"image": images(sc)}})
        contains.append({(t.color, t.shape) for t in sc.things})
    counts: Dict[Tuple[str, str], List[str]] = {}
    for doc, objs in zip(corpus, contains):
        for o in objs:
            counts.setdefault(o, []).append(doc["id"])
    queries = [{"id": f"q{i:04d}", "query": {"text": f"a {c} {s}"}, "relevant": {d: 1 for d in docs}}
               for i, ((c, s), docs) in enumerate(sorted(counts.items())) if 1 <= len(docs) <= 8]
    rng.shuffle(queries)
    q_path = write_jsonl(out / "scene_search_queries.jsonl", queries[:n_queries])
    c_path = write_jsonl(out / "scene_search_corpus.jsonl", corpus)
    q, d = INSTRUCTIONS["scene_search"]
    tasks.append({"name": "scene_search", "type": "retrieval", "queries": str(q_path), "corpus": str(c_path),
                  "query_instruction": q, "doc_instruction": d})

    # passage search: held-out documentation topics
    pool = _split_passages("eval")
    rng.shuffle(pool)
    pool = pool[:corpus_size]
    corpus = [{"id": f"p{i:04d}", "doc": {"text": rest}} for i, (_, _, rest) in enumerate(pool)]
    queries = [{"id": f"q{i:04d}", "query": {"text": head}, "relevant": {f"p{i:04d}": 1}}
               for i, (_, head, _) in enumerate(pool[:n_queries])]
    q_path = write_jsonl(out / "passage_search_queries.jsonl", queries)
    c_path = write_jsonl(out / "passage_search_corpus.jsonl", corpus)
    q, d = INSTRUCTIONS["passage_search"]
    tasks.append({"name": "passage_search", "type": "retrieval", "queries": str(q_path), "corpus": str(c_path),
                  "query_instruction": q, "doc_instruction": d})
    return tasks
