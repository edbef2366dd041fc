"""Readers for the published data layouts, so downloaded benchmark and training sets are used as they are.

Evaluation:

* **MMEB-eval** (VLM2Vec): one folder per task holding parquet files with columns ``qry_text`` (the task's
  instruction and the query, ``<|image_1|>`` where the query image goes), ``qry_img_path`` (``""`` = no
  image), ``tgt_text`` (list) and ``tgt_img_path`` (list, ``""`` = no image), the gold candidate first. Image
  paths are relative to the released image folder (``image_root``). :func:`read_mmeb_task`.
* **ViDoRe v1/v2, BEIR layout**: a folder holding ``corpus/`` (``corpus-id``, ``image``: bytes, or the
  ``{"bytes", "path"}`` struct datasets writes), ``queries/`` (``query-id``, ``query``, ``language`` where
  present) and ``qrels/`` (``query-id``, ``corpus-id``, ``score``), each a folder of parquet files (a single
  ``corpus.parquet`` etc. works too). Images stay encoded in memory (:class:`EncodedImage`) and are decoded
  when embedded, never written to files. :func:`read_beir`.

A side produced here is a normal embedding side (:mod:`moca.data.retrieval`): text, ``{"image": path}``,
``{"image": EncodedImage}`` or ``{"content": [...]}`` for interleaved text and images.

Every image these readers name goes through :mod:`moca.data.images`: paths through
:func:`~moca.data.images.resolve_image_path` (confined to the image root unless ``allow_outside_paths``), bytes
through :func:`~moca.data.images.open_image_bytes` (the pixel bound and the bad-image reasons of files).
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, open_image_bytes, resolve_image_path

log = logging.getLogger("moca.data")

MMEB_IMAGE_TOKEN = "<|image_1|>"
QWEN_IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class EncodedImage:
    """An image kept as its encoded bytes (PNG, JPEG, ...), decoded on use.

    Args:
        data: the encoded bytes.
        key: a stable name (``file.parquet:row``), used in messages and to recognise the same image twice.
    """

    __slots__ = ("data", "key")

    def __init__(self, data: bytes, key: str):
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise ValueError(f"{key}: image bytes are empty or not bytes ({type(data).__name__})")
        self.data, self.key = bytes(data), key

    def decode(self, max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, spec=None):
        """The decoded RGB PIL image, through :func:`moca.data.images.open_image_bytes`: width x height is checked
        against ``max_pixels`` from the header before decoding (None = no bound) and, with ``spec`` (an ImageSpec), Qwen's shape rule. Raises
        :class:`~moca.data.images.ImageError` (a ValueError with a ``reason``) naming :attr:`key`."""
        return open_image_bytes(self.data, self.key, max_pixels, spec)

    def __repr__(self) -> str:
        return f"EncodedImage({self.key}, {len(self.data)} bytes)"


def image_from_cell(value, key: str) -> Optional[EncodedImage]:
    """A parquet image cell (raw bytes or the datasets ``{"bytes": ..., "path": ...}`` struct) -> EncodedImage."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("bytes")
        if value is None:
            raise ValueError(f"{key}: the image struct holds no bytes (only a path); the BEIR reader needs embedded "
                             "image bytes")
    return EncodedImage(value, key)


# ------------------------------------------------------------------------------------------------------------
# Parquet folders
# ------------------------------------------------------------------------------------------------------------


def parquet_files(path: Union[str, Path], what: str = "data") -> List[Path]:
    """The parquet files of a folder (recursively, sorted) or the file itself."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: {p} does not exist")
    files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
    if not files:
        raise FileNotFoundError(f"{what}: no .parquet file in {p}")
    return files


def read_parquet_rows(path: Union[str, Path], what: str = "data",
                      columns: Optional[Sequence[str]] = None) -> List[Tuple[dict, str]]:
    """All rows of a parquet file or folder as ``(row dict, "file.parquet:row")`` (rows counted from 1)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:   # pragma: no cover - pyarrow is a dependency of the model extra
        raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from exc
    out = []
    for f in parquet_files(path, what):
        table = pq.read_table(f)
        if columns is not None:
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                raise ValueError(f"{what}: {f} has no column {missing[0]!r} (columns: {table.column_names})")
        for n, row in enumerate(table.to_pylist(), 1):
            out.append((row, f"{f.name}:{n}"))
    return out


def literal_list(value, where: str) -> list:
    """A list cell, or a list stored as a Python-literal string (``"['a', 'b']"``, parsed with
    ``ast.literal_eval``, never ``eval``). None and ``""`` are the empty list; a plain string is one item."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return []
        if s[0] in "[(":
            try:
                parsed = ast.literal_eval(s)
            except (ValueError, SyntaxError) as exc:
                raise ValueError(f"{where}: cannot parse the list literal {s[:80]!r} ({type(exc).__name__})") from exc
            if not isinstance(parsed, (list, tuple)):
                raise ValueError(f"{where}: expected a list literal, got {type(parsed).__name__}")
            return list(parsed)
        return [value]
    raise ValueError(f"{where}: expected a list, got {type(value).__name__}")


# ------------------------------------------------------------------------------------------------------------
# Text with image placeholders -> sides
# ------------------------------------------------------------------------------------------------------------


def placeholder_side(text: Optional[str], images: Sequence, placeholder: str, where: str):
    """Text with ``placeholder`` marking where each image goes -> an embedding side.

    Images without a placeholder in the text are put before it (VLM2Vec's rule for a missing token); more
    placeholders than images is an error naming ``where``.
    """
    text = text or ""
    parts = text.split(placeholder)
    n_slots = len(parts) - 1
    images = list(images)
    if n_slots > len(images):
        raise ValueError(f"{where}: the text has {n_slots} image placeholder(s) {placeholder!r} but "
                         f"{len(images)} image(s)")
    lead = [{"image": im} for im in images[:len(images) - n_slots]] if n_slots < len(images) else []
    rest = images[len(images) - n_slots:] if n_slots else []
    content = list(lead)
    for i, part in enumerate(parts):
        if part.strip():              # the text as published (its newlines too), whitespace-only parts dropped
            content.append({"text": part})
        if i < n_slots:
            content.append({"image": rest[i]})
    if not content:
        raise ValueError(f"{where}: neither text nor image")
    if len(content) == 1:
        return content[0]["text"] if "text" in content[0] else {"image": content[0]["image"]}
    return {"content": content}


def _mmeb_image(path, root, where: str, allow_outside: bool = False) -> Optional[str]:
    """A published image path (``""`` / None = no image) joined to ``root`` through
    :func:`moca.data.images.resolve_image_path`: confined to ``root`` (a folder or an
    :class:`~moca.data.images.ImageRoot`) unless ``allow_outside``; ``root`` None = the path as given.
    Raises :class:`~moca.data.images.ImageError` (reason ``outside_data_folder``) naming ``where``."""
    if path is None or (isinstance(path, str) and not path.strip()):
        return None
    try:
        return str(resolve_image_path(path, root, allow_outside))
    except ImageError as exc:
        raise ImageError(f"{where}: {exc}", exc.reason) from exc


def mmeb_image_root(folder: Union[str, Path], image_root: Optional[Union[str, Path]] = None) -> Path:
    """The folder an MMEB task's image paths are relative to: ``image_root``, else the task folder (or the
    folder of a single parquet file)."""
    if image_root is not None:
        return Path(image_root)
    return Path(folder) if Path(folder).is_dir() else Path(folder).parent


def mmeb_side(text, img_path, root, where: str, allow_outside: bool = False):
    """One MMEB query or candidate (text with ``<|image_1|>``, image path or ``""``) -> a side (the image path
    resolved and confined as :func:`_mmeb_image` does)."""
    img = _mmeb_image(img_path, root, where, allow_outside)
    return placeholder_side(text, [img] if img else [], MMEB_IMAGE_TOKEN, where)


@dataclass
class CandidateRecord:
    """One MMEB-style query: its side, the candidate sides, and the gold candidate's index."""

    id: str
    query: object
    candidates: List[object]
    gold: int = 0


def read_mmeb_task(folder: Union[str, Path], image_root: Optional[Union[str, Path]] = None,
                   limit: Optional[int] = None, allow_outside_paths: bool = False) -> List[CandidateRecord]:
    """The records of one MMEB-eval task folder (parquet). Gold = candidate 0, as published.

    Args:
        folder: the task's folder (or one parquet file).
        image_root: the released image folder that ``qry_img_path`` / ``tgt_img_path`` are relative to
            (None: the task folder).
        limit: read only the first ``limit`` records.
        allow_outside_paths: allow image paths that resolve outside the image folder (``../``, absolute paths
            elsewhere, symlinks out); by default such a path raises :class:`~moca.data.images.ImageError`
            naming the record.
    """
    root = mmeb_image_root(folder, image_root)
    rows = read_parquet_rows(folder, f"MMEB task {folder}",
                             columns=["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"])
    out = []
    for row, where in rows[:limit]:
        texts = literal_list(row["tgt_text"], f"{where} tgt_text")
        paths = literal_list(row["tgt_img_path"], f"{where} tgt_img_path")
        if not texts and paths:
            texts = [""] * len(paths)
        if not paths and texts:
            paths = [""] * len(texts)
        if len(texts) != len(paths):
            raise ValueError(f"{where}: tgt_text has {len(texts)} items but tgt_img_path {len(paths)}")
        if not texts:
            raise ValueError(f"{where}: no candidate (tgt_text and tgt_img_path are empty)")
        q = mmeb_side(row["qry_text"], row["qry_img_path"], root, f"{where} query", allow_outside_paths)
        cands = [mmeb_side(t, p, root, f"{where} candidate {j}", allow_outside_paths)
                 for j, (t, p) in enumerate(zip(texts, paths))]
        out.append(CandidateRecord(where, q, cands, 0))
    if not out:
        raise ValueError(f"MMEB task {folder}: no records")
    return out


# ------------------------------------------------------------------------------------------------------------
# BEIR layout (ViDoRe)
# ------------------------------------------------------------------------------------------------------------


@dataclass
class BeirTask:
    """A BEIR-layout retrieval task in memory: queries, corpus (images still encoded) and judgments."""

    query_ids: List[str]
    queries: List[object]
    doc_ids: List[str]
    docs: List[object]
    qrels: Dict[str, Dict[str, float]]
    languages: Dict[str, int] = field(default_factory=dict)   # language -> number of queries (before filtering)
    dropped_unjudged: int = 0


def _sub(folder: Path, name: str) -> Path:
    for cand in (folder / name, folder / f"{name}.parquet"):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"BEIR task {folder}: no '{name}' folder or {name}.parquet (a BEIR layout holds corpus/, "
                            "queries/ and qrels/)")


def read_beir(folder: Union[str, Path], language: Optional[Union[str, Sequence[str]]] = None,
              limit_queries: Optional[int] = None) -> BeirTask:
    """Read a BEIR-layout task (ViDoRe v1/v2).

    Args:
        folder: holding ``corpus``, ``queries`` and ``qrels`` (folders of parquet, or ``<name>.parquet``).
        language: keep only queries in this language / these languages (``queries`` must then have a
            ``language`` column); None = all.
        limit_queries: keep the first n queries (after filtering).

    Queries without any judgment are dropped (BEIR evaluates only judged queries); judgments naming an
    unknown query or document raise.
    """
    folder = Path(folder)
    crow = read_parquet_rows(_sub(folder, "corpus"), f"BEIR corpus {folder}", columns=["corpus-id", "image"])
    qrow = read_parquet_rows(_sub(folder, "queries"), f"BEIR queries {folder}", columns=["query-id", "query"])
    rrow = read_parquet_rows(_sub(folder, "qrels"), f"BEIR qrels {folder}", columns=["query-id", "corpus-id", "score"])
    doc_ids, docs, seen = [], [], set()
    for row, where in crow:
        did = str(row["corpus-id"])
        if did in seen:
            raise ValueError(f"BEIR corpus {folder}: duplicate corpus-id {did!r} ({where})")
        seen.add(did)
        img = image_from_cell(row["image"], where)
        if img is None:
            raise ValueError(f"BEIR corpus {folder}: {where} (corpus-id {did!r}) has no image")
        doc_ids.append(did)
        docs.append({"image": img})
    langs: Dict[str, int] = {}
    wanted = None if language is None else ({language} if isinstance(language, str) else set(language))
    if wanted is not None and qrow and "language" not in qrow[0][0]:
        raise ValueError(f"BEIR queries {folder}: language={sorted(wanted)} asked for but the queries have no "
                         "'language' column")
    qids, queries = [], []
    for row, where in qrow:
        lang = row.get("language")
        if lang is not None:
            langs[str(lang)] = langs.get(str(lang), 0) + 1
        if wanted is not None and lang not in wanted:
            continue
        if not isinstance(row["query"], str) or not row["query"].strip():
            raise ValueError(f"BEIR queries {folder}: {where} (query-id {row['query-id']!r}) has an empty query")
        qids.append(str(row["query-id"]))
        queries.append(row["query"])
    if wanted is not None and not qids:
        raise ValueError(f"BEIR queries {folder}: no query in language {sorted(wanted)} (languages: {langs})")
    qrels: Dict[str, Dict[str, float]] = {}
    known_q = {str(row["query-id"]) for row, _ in qrow}
    for row, where in rrow:
        q, d = str(row["query-id"]), str(row["corpus-id"])
        if q not in known_q:
            raise ValueError(f"BEIR qrels {folder}: {where} names query-id {q!r}, not in queries")
        if d not in seen:
            raise ValueError(f"BEIR qrels {folder}: {where} names corpus-id {d!r}, not in the corpus")
        qrels.setdefault(q, {})[d] = float(row["score"])
    keep = [i for i, q in enumerate(qids) if q in qrels]
    dropped = len(qids) - len(keep)
    if dropped:
        log.info("BEIR task %s: %d queries without judgments left out (as BEIR does)", folder, dropped)
    keep = keep[:limit_queries]
    if not keep:
        raise ValueError(f"BEIR task {folder}: no query has a judgment in qrels")
    return BeirTask([qids[i] for i in keep], [queries[i] for i in keep], doc_ids, docs,
                    {qids[i]: qrels[qids[i]] for i in keep}, langs, dropped)


# ------------------------------------------------------------------------------------------------------------
# Training sets
# ------------------------------------------------------------------------------------------------------------

PAIR_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")


def _pair_side(text, img_path, root, where: str):
    img = _mmeb_image(img_path, root, where)
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    if img is None:     # as the official loader: a placeholder without an image is removed
        text = text.replace(MMEB_IMAGE_TOKEN, "")
        if not text.strip():
            raise ValueError(f"{where}: neither text nor image")
    return placeholder_side(text, [img] if img else [], MMEB_IMAGE_TOKEN, where)


def pair_record(rec: dict, root, where: str) -> dict:
    """One MoCa-CL-Pairs / mmE5 / MMEB-train row -> our pair record ``{"query", "positive", "negatives"}``.

    Columns: ``qry`` (text, ``<|image_1|>`` where the image goes), ``qry_image_path``, ``pos_text``,
    ``pos_image_path``, and optionally ``neg_text`` / ``neg_image_path`` (lists, or lists written as
    Python-literal strings: parsed with ``ast.literal_eval``). Image paths are relative to ``root`` (the
    downloaded image folder: a folder, confined, or an :class:`~moca.data.images.ImageRoot` with its own
    ``allow_outside``; None = as given) and resolved through :func:`moca.data.images.resolve_image_path`.
    A negative with neither text nor image is dropped. Raises ValueError naming ``where``
    (:class:`~moca.data.images.ImageError`, reason ``outside_data_folder``, for a path leading out of ``root``).
    """
    missing = [c for c in PAIR_COLUMNS if c not in rec]
    if missing:
        raise ValueError(f"{where}: not a pairs record: no {missing[0]!r} (columns: {sorted(rec)})")
    out = {"query": _pair_side(rec["qry"], rec["qry_image_path"], root, f"{where} query"),
           "positive": _pair_side(rec["pos_text"], rec["pos_image_path"], root, f"{where} positive")}
    texts = literal_list(rec.get("neg_text"), f"{where} neg_text")
    paths = literal_list(rec.get("neg_image_path"), f"{where} neg_image_path")
    n = max(len(texts), len(paths))
    texts += [""] * (n - len(texts))
    paths += [""] * (n - len(paths))
    negs = []
    for j, (t, p) in enumerate(zip(texts, paths)):
        if (t is None or not str(t).replace(MMEB_IMAGE_TOKEN, "").strip()) and not p:
            continue
        negs.append(_pair_side(t, p, root, f"{where} negatives[{j}]"))
    out["negatives"] = negs
    if rec.get("id") is not None:
        out["id"] = rec["id"]
    return out


def pretrain_record(rec: dict, where: str) -> dict:
    """One MoCa pre-training row (``text`` with ``<|vision_start|><|image_pad|><|vision_end|>`` where each image
    goes, ``images``: a list of encoded images, bytes or ``{"bytes", "path"}``) -> our Stage 1 record
    ``{"content": [{"text": ...}, {"image": EncodedImage}, ...]}``. Raises ValueError naming ``where``."""
    if "text" not in rec:
        raise ValueError(f"{where}: not a pre-training record: no 'text' (columns: {sorted(rec)})")
    imgs = rec.get("images") or []
    if not isinstance(imgs, (list, tuple)):
        imgs = [imgs]
    images = [image_from_cell(v, f"{where} images[{j}]") for j, v in enumerate(imgs)]
    text = rec["text"] or ""
    if text.count(QWEN_IMAGE_PLACEHOLDER) != len(images):
        raise ValueError(f"{where}: the text has {text.count(QWEN_IMAGE_PLACEHOLDER)} image placeholder(s) but "
                         f"{len(images)} image(s)")
    side = placeholder_side(text, images, QWEN_IMAGE_PLACEHOLDER, where)
    content = side["content"] if isinstance(side, dict) and "content" in side else \
        [{"text": side}] if isinstance(side, str) else [side]
    out = {"content": content}
    if rec.get("id") is not None:
        out["id"] = rec["id"]
    return out


__all__ = ["mmeb_image_root", "pair_record", "pretrain_record", "EncodedImage", "image_from_cell", "parquet_files", "read_parquet_rows", "literal_list", "placeholder_side",
           "mmeb_side", "CandidateRecord", "read_mmeb_task", "BeirTask", "read_beir", "MMEB_IMAGE_TOKEN",
           "QWEN_IMAGE_PLACEHOLDER"]
