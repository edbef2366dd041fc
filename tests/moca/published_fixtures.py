"""Tiny files in exactly the published schemas (written by the tests; nothing is downloaded)."""

import io
import json
import random
from pathlib import Path

import numpy as np


def _png(color, size=(40, 28), seed=0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.asarray(color, np.float32)[None, None] + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "purple": (140, 30, 160), "gray": (128, 128, 128)}


def _write_parquet(path: Path, rows, schema=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_mmeb(root: Path, n_queries: int = 6, n_cands: int = 4, seed: int = 0, literal_lists: bool = False):
    """MMEB-eval: <root>/eval/<Task>/test-00000-of-00001.parquet and <root>/images/<Task>/*.png, for two tasks:
    ImageNet-1K (classification, IND: image query, text candidates) and MSCOCO_t2i (retrieval, IND: text
    query, image candidates), gold first, texts with <|image_1|> as published."""
    g = random.Random(seed)
    names = list(COLORS)
    img_root = root / "images"
    tasks = {}
    # classification: "<|image_1|> Represent ..." query with an image, label texts as candidates
    rows = []
    for i in range(n_queries):
        gold = names[i % len(names)]
        rel = f"ImageNet-1K/{i}.png"
        (img_root / rel).parent.mkdir(parents=True, exist_ok=True)
        (img_root / rel).write_bytes(_png(COLORS[gold], seed=i))
        others = [c for c in names if c != gold]
        g.shuffle(others)
        cands = [gold] + others[:n_cands - 1]
        rows.append({"qry_text": "<|image_1|> Represent the given image for classification.\n", "qry_img_path": rel,
                     "tgt_text": str(cands) if literal_lists else cands,
                     "tgt_img_path": str([""] * n_cands) if literal_lists else [""] * n_cands})
    tasks["ImageNet-1K"] = _write_parquet(root / "eval" / "ImageNet-1K" / "test-00000-of-00001.parquet", rows).parent
    rows = []
    for i in range(n_queries):
        order = list(range(n_cands))
        paths = []
        for j in order:
            c = names[(i + j) % len(names)]
            rel = f"MSCOCO_t2i/{i}_{j}.png"
            (img_root / rel).parent.mkdir(parents=True, exist_ok=True)
            (img_root / rel).write_bytes(_png(COLORS[c], seed=100 + 10 * i + j))
            paths.append(rel)
        rows.append({"qry_text": f"Find me an everyday image that matches the given caption: a {names[i % len(names)]} "
                                 "picture", "qry_img_path": "",
                     "tgt_text": ["<|image_1|> Represent the given image."] * n_cands, "tgt_img_path": paths})
    tasks["MSCOCO_t2i"] = _write_parquet(root / "eval" / "MSCOCO_t2i" / "test-00000-of-00001.parquet", rows).parent
    return tasks, img_root


def write_beir(folder: Path, n_docs: int = 8, n_queries: int = 6, seed: int = 0, struct_images: bool = True,
               split_files: bool = True):
    """ViDoRe BEIR layout: corpus/ (corpus-id, image bytes), queries/ (query-id, query, language),
    qrels/ (query-id, corpus-id, score), each a folder of parquet files."""
    import pyarrow as pa

    g = random.Random(seed)
    names = list(COLORS)
    corpus = []
    for d in range(n_docs):
        data = _png(COLORS[names[d % len(names)]], size=(36, 48), seed=200 + d)
        corpus.append({"corpus-id": d, "image": {"bytes": data, "path": f"page_{d}.png"} if struct_images else data,
                       "doc-id": f"report_{d // 3}.pdf", "page_number_in_doc": d % 3})
    queries, qrels = [], []
    for q in range(n_queries):
        lang = "english" if q % 3 else "french"
        queries.append({"query-id": q, "query": f"which page is mostly {names[q % len(names)]}?", "language": lang})
        qrels.append({"query-id": q, "corpus-id": q % n_docs, "score": 1})
        if q % 2:
            qrels.append({"query-id": q, "corpus-id": (q + len(names)) % n_docs, "score": 2})
    if struct_images:
        img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    else:
        img_t = pa.binary()
    cs = pa.schema([("corpus-id", pa.int64()), ("image", img_t), ("doc-id", pa.string()),
                    ("page_number_in_doc", pa.int64())])
    half = n_docs // 2 if split_files else n_docs
    _write_parquet(folder / "corpus" / "test-00000-of-00002.parquet", corpus[:half], cs)
    if split_files:
        _write_parquet(folder / "corpus" / "test-00001-of-00002.parquet", corpus[half:], cs)
    _write_parquet(folder / "queries" / "test-00000-of-00001.parquet", queries)
    _write_parquet(folder / "qrels" / "test-00000-of-00001.parquet", qrels)
    return folder


def write_pairs(path: Path, img_root: Path, n: int = 12, literal: bool = True):
    """MoCa-CL-Pairs / mmE5 / MMEB-train rows (parquet): qry, qry_image_path, pos_text, pos_image_path, neg_text,
    neg_image_path, the negative lists as Python-literal strings (as released) when ``literal``."""
    names = list(COLORS)
    rows = []
    for i in range(n):
        c = names[i % len(names)]
        o = names[(i + 1) % len(names)]
        rel = f"train/{i}.png"
        (img_root / rel).parent.mkdir(parents=True, exist_ok=True)
        (img_root / rel).write_bytes(_png(COLORS[c], seed=300 + i))
        negs_t, negs_p = [f"a {o} picture"], [""]
        if i % 2:          # only one negative on odd rows: padded by repeating the last one
            negs_t.append(f"a {names[(i + 2) % len(names)]} picture")
            negs_p.append("")
        rows.append({"qry": "<|image_1|> Represent the given image for classification.\n", "qry_image_path": rel,
                     "pos_text": f"a {c} picture", "pos_image_path": "",
                     "neg_text": str(negs_t) if literal else negs_t, "neg_image_path": str(negs_p) if literal else negs_p})
    return _write_parquet(path, rows)


def write_pretrain(path: Path, n: int = 8):
    """MoCa pre-training rows (parquet): text with <|vision_start|><|image_pad|><|vision_end|> where each image
    goes, images as a list of encoded bytes."""
    names = list(COLORS)
    ph = "<|vision_start|><|image_pad|><|vision_end|>"
    rows = []
    for i in range(n):
        c = names[i % len(names)]
        rows.append({"text": f"Here is a {c} square. {ph} It is {c}, bright and plain; the next one {ph} differs.",
                     "images": [_png(COLORS[c], seed=400 + i), _png(COLORS[names[(i + 3) % len(names)]], seed=500 + i)]})
    return _write_parquet(path, rows)
