"""Embedded default data, generated deterministically with no download.

* **Scenes**: procedurally drawn shapes with compositional captions ("a large red circle to the left of a
  small blue triangle"). :func:`random_scene` draws a :class:`Scene` spec from a seeded RNG,
  :func:`draw_scene` renders it with Pillow, :func:`caption` describes it.
* **Passages**: paragraphs of the Python documentation bundled with every Python install
  (``pydoc_data.topics``), split into short passages with their topic as a title.
* **Interleaved documents** for Stage 1 (:func:`write_cpt_corpus`): passages and scenes mixed into records of
  the trainer's JSONL format, with the images written as PNG files next to the JSONL.

The same seed gives byte-identical output. Stage 2 and evaluation build their pairs from these pieces too.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..fsutil import atomic_save_image, atomic_write_text

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20), "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = {"small": 0.22, "large": 0.38}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (180, 180, 180)}
RELATIONS = ("to the left of", "above")


@dataclass
class Thing:
    shape: str
    color: str
    size: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape}"


@dataclass
class Scene:
    """One or two shapes on a background; with two, ``relation`` says where the first is relative to the second."""

    things: List[Thing]
    background: str = "white"
    relation: Optional[str] = None
    jitter: Tuple[float, float] = (0.0, 0.0)
    extra: Dict[str, str] = field(default_factory=dict)


def random_scene(rng: random.Random, max_things: int = 2) -> Scene:
    """A random scene from ``rng`` (a ``random.Random``)."""
    n = rng.randint(1, max_things)
    things = [Thing(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))) for _ in range(n)]
    if n == 2 and things[0].color == things[1].color and things[0].shape == things[1].shape:
        things[1].color = rng.choice([c for c in COLORS if c != things[0].color])
    relation = rng.choice(RELATIONS) if n == 2 else None
    return Scene(things, rng.choice(list(BACKGROUNDS)), relation, (rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06)))


def caption(scene: Scene) -> str:
    """A compositional caption of the scene."""
    if len(scene.things) == 1:
        return f"{scene.things[0].phrase()} on a {scene.background} background"
    a, b = scene.things
    return f"{a.phrase()} {scene.relation} {b.phrase()} on a {scene.background} background"


def draw_scene(scene: Scene, size: int = 112):
    """Render a scene as an RGB PIL image of ``size`` x ``size`` pixels."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    jx, jy = scene.jitter
    if len(scene.things) == 1:
        centers = [(0.5 + jx, 0.5 + jy)]
    elif scene.relation == "to the left of":
        centers = [(0.27 + jx, 0.5 + jy), (0.73 + jx, 0.5 - jy)]
    else:
        centers = [(0.5 + jx, 0.27 + jy), (0.5 - jx, 0.73 + jy)]
    for thing, (cx, cy) in zip(scene.things, centers):
        r = SIZES[thing.size] * size / 2
        x, y = cx * size, cy * size
        col = COLORS[thing.color]
        if thing.shape == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=col)
        elif thing.shape == "square":
            d.rectangle([x - r, y - r, x + r, y + r], fill=col)
        elif thing.shape == "triangle":
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=col)
        elif thing.shape == "diamond":
            d.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=col)
        else:  # cross
            t = r / 3
            d.rectangle([x - r, y - t, x + r, y + t], fill=col)
            d.rectangle([x - t, y - r, x + t, y + r], fill=col)
    return img


def passages(max_words: int = 60, min_words: int = 12) -> List[Tuple[str, str]]:
    """(title, passage) pairs from Python's bundled documentation, in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for title in sorted(topics):
        text = topics[title]
        for para in re.split(r"\n\s*\n", text):
            words = para.split()
            if len(words) < min_words or sum(w.isalpha() for w in words) < 0.6 * len(words):
                continue   # skip code listings and tables
            for i in range(0, len(words), max_words):
                chunk = words[i:i + max_words]
                if len(chunk) >= min_words:
                    out.append((title, " ".join(chunk)))
    return out


def tokenizer_corpus(n_captions: int = 4000, seed: int = 0) -> List[str]:
    """Texts the tiny tokenizer is trained on: every passage and a few thousand captions."""
    rng = random.Random(seed)
    texts = [f"{t}: {p}" for t, p in passages()]
    texts += [caption(random_scene(rng)) for _ in range(n_captions)]
    return texts


def write_cpt_corpus(out_dir, n_docs: int = 400, seed: int = 0, image_size: int = 112,
                     max_images: int = 2, passage_words: int = 40) -> Path:
    """Write interleaved Stage 1 documents as ``out_dir/cpt.jsonl`` plus PNG images in ``out_dir/images``.

    Each record is ``{"id": ..., "content": [{"text": ...}, {"image": "images/x.png"}, ...]}``: a passage
    with 0 to ``max_images`` captioned scenes placed before, inside or after it. Returns the JSONL path.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pool = passages(max_words=passage_words)
    lines = []
    for i in range(n_docs):
        title, text = pool[rng.randrange(len(pool))]
        content = [{"text": f"{title}: {text}"}]
        for j in range(rng.randint(0, max_images)):
            scene = random_scene(rng)
            name = f"images/doc{i:05d}_{j}.png"
            atomic_save_image(draw_scene(scene, image_size), out / name, optimize=False, compress_level=6)
            piece = [{"image": name}, {"text": f"Figure: {caption(scene)}."}]
            at = rng.randint(0, len(content))
            content[at:at] = piece
        lines.append(json.dumps({"id": f"doc{i:05d}", "content": content}))
    path = out / "cpt.jsonl"
    atomic_write_text(path, "\n".join(lines) + "\n")    # never half a corpus under the final name
    return path


def ensure_cpt_corpus(out_dir, n_docs: int = 400, seed: int = 0) -> Path:
    """``out_dir/cpt.jsonl`` from :func:`write_cpt_corpus`, written only when absent, written for other
    settings, or damaged: ``out_dir/cpt_index.json`` (written last) records the settings and the size and
    checksum of the JSONL and of every image, and is checked before the corpus is reused."""
    from ..fsutil import files_named_by_jsonl, load_index, save_index

    out = Path(out_dir)
    index = out / "cpt_index.json"
    key = {"docs": n_docs, "seed": seed}
    if load_index(index, lambda d: d.get("key") == key) is None:
        path = write_cpt_corpus(out, n_docs=n_docs, seed=seed)
        save_index(index, {"key": key, "corpus": path.name}, files_named_by_jsonl([path]))
    return out / "cpt.jsonl"
