"""Embedding inputs for Stage 2 and evaluation: one "side" (text, image or interleaved) -> one :class:`Sample`,
and the contrastive pair records (query, positive, hard negatives) of Stage 2.

A **side** is what one embedding is computed from. Accepted forms (records in JSONL, or Python objects given to
:meth:`moca.embedding.MocaEmbedder.encode`)::

    "a red circle"                                   text
    {"text": "a red circle"}                         text
    {"image": "images/x.png"}                        image (a path; relative paths resolve against the record file)
    {"image": "images/x.png", "text": "..."}         image, then text
    {"content": [{"text": ...}, {"image": ...}, ...]}   interleaved, in order
    ["Look:", PIL.Image, {"image": "y.png"}, "and"]  interleaved (Python only: str = text, PIL image / Path = image)

An instruction (per subset or per call) becomes a leading text segment. A side becomes
``[instruction] segments... [<|endoftext|>]`` (the end token only when asked: ``append_eos`` / ``eos`` pooling),
each image expanded into ``<|vision_start|> <|image_pad|> x n <|vision_end|>`` exactly as in Stage 1.

A **pair record** (one JSONL line of a Stage 2 subset)::

    {"id": "...", "query": SIDE, "positive": SIDE, "negatives": [SIDE, ...]}

Problems raise :class:`~moca.data.processor.BadRecord` naming the item (``texts[3]``, ``scenes.jsonl:17 query``)
and a reason: a missing or unreadable image, an image path leading out of the data folder (records only; see
:func:`moca.data.images.resolve_image_path`), an image above the pixel bound or of an unusable shape, an empty
text, a vision placeholder token in a text, an empty side.
"""

from __future__ import annotations

import json
import logging
import os
import random
import reprlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .batch import Sample
from .images import (DEFAULT_MAX_IMAGE_PIXELS, VISION_TOKENS, ImageError, ImageSpec, check_image_source, image_root,
                     preprocess_image, resolve_image_path)
from .loader import WARN_FIRST, RecordSet, parse_record_line, read_lines
from .processor import BadRecord, MocaProcessor, check_text, load_record_image, truncate_tokens
from .published import EncodedImage
from .sampler import TaskBatchSampler

log = logging.getLogger("moca.data")

SIDE_KEYS = ("query", "positive")


# ------------------------------------------------------------------------------------------------------------
# Sides -> segments -> samples
# ------------------------------------------------------------------------------------------------------------


def _is_pil(x) -> bool:
    """A PIL image, or an image kept encoded in memory (:class:`moca.data.published.EncodedImage`)."""
    from .published import EncodedImage

    if isinstance(x, EncodedImage):
        return True
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency of the model extra
        return False
    return isinstance(x, Image.Image)


def side_segments(side, where: str) -> List[dict]:
    """Normalise one side (see the module docstring) to a list of ``{"text": str}`` / ``{"image": path | PIL}``.

    Raises BadRecord naming ``where`` for an empty side, an empty text or an unknown form.
    """
    if isinstance(side, str):
        segs = [{"text": side}]
    elif isinstance(side, os.PathLike) or _is_pil(side):
        segs = [{"image": side}]
    elif isinstance(side, dict):
        if "content" in side:
            if not isinstance(side["content"], list):
                raise BadRecord(where, "'content' must be a list of {'text': ...} / {'image': ...} segments", "malformed")
            segs = [_segment(s, f"{where} segment {i}") for i, s in enumerate(side["content"])]
        else:
            unknown = set(side) - {"text", "image", "images"}
            if unknown or not (set(side) & {"text", "image", "images"}):
                raise BadRecord(where, f"a side needs 'text', 'image' or 'content', got keys {sorted(side)}", "malformed")
            segs = []
            imgs = side.get("image", side.get("images"))
            if imgs is not None:
                segs += [{"image": p} for p in (imgs if isinstance(imgs, (list, tuple)) else [imgs])]
            if side.get("text") is not None:
                segs.append({"text": side["text"]})
    elif isinstance(side, (list, tuple)):
        segs = [_segment(s, f"{where} segment {i}") for i, s in enumerate(side)]
    elif side is None:
        raise BadRecord(where, "is missing (None)", "malformed")
    else:
        raise BadRecord(where, f"cannot be embedded: expected text, an image or a list of them, got {type(side).__name__}",
                        "malformed")
    if not segs:
        raise BadRecord(where, "is empty (no text and no image)", "empty")
    for i, s in enumerate(segs):
        if "text" in s:
            if not isinstance(s["text"], str):
                raise BadRecord(where, f"text must be a string, got {type(s['text']).__name__}", "malformed")
            if not s["text"].strip():
                raise BadRecord(where, "has an empty text" + (f" (segment {i})" if len(segs) > 1 else ""), "empty_text")
        elif not (isinstance(s["image"], (str, os.PathLike)) or _is_pil(s["image"])):
            raise BadRecord(where, f"image must be a path or a PIL image, got {type(s['image']).__name__}", "malformed")
    return segs


def _segment(seg, where: str) -> dict:
    if isinstance(seg, str):
        return {"text": seg}
    if isinstance(seg, os.PathLike) or _is_pil(seg):
        return {"image": seg}
    if isinstance(seg, dict) and len(seg.keys() & {"text", "image"}) == 1 and len(seg) == 1:
        return dict(seg)
    raise BadRecord(where, f"must be a text, an image, {{'text': ...}} or {{'image': ...}}, got {reprlib.repr(seg)}"[:200],
                    "malformed")


def resolve_image(path, root=None) -> Path:
    """A side's image path resolved against ``root`` (confined to it unless allowed): kept for callers;
    :func:`moca.data.images.resolve_image_path` does the work and :func:`moca.data.images.load_image` loads."""
    return resolve_image_path(path, image_root(root))


def check_side(side, where: str, root=None, spec: Optional[ImageSpec] = None) -> List[dict]:
    """Validate a side without decoding its images; returns its segments.

    Checks each text for vision placeholder tokens and each image (a path, or bytes kept encoded) from its
    header alone: a path inside the data folder (``root``, see :func:`moca.data.images.resolve_image_path`),
    an existing image file (or bytes) of a known format, within the pixel bound and (with ``spec``) of a shape Qwen's resize rule can use. Raises
    :class:`BadRecord` naming ``where`` with the reason.
    """
    segs = side_segments(side, where)
    root = image_root(root)
    for s in segs:
        if "text" in s:
            check_text(s["text"], where)
            found = [t for t in VISION_TOKENS if t in s["text"]]
            if found:
                raise BadRecord(where, f"text contains the vision placeholder token {found[0]} (only images may "
                                       "put vision tokens in a sequence)", "vision_token_in_text")
        elif isinstance(s["image"], EncodedImage) or not _is_pil(s["image"]):
            try:                                                 # a path, or bytes (a BEIR corpus)
                check_image_source(s["image"], root, spec)
            except ImageError as exc:
                raise BadRecord(where, str(exc), exc.reason) from exc
    return segs


def build_sample(processor: MocaProcessor, side, where: str, root=None,
                 instruction: Optional[str] = None, add_eos: bool = True,
                 max_length: Optional[int] = None) -> Sample:
    """One side -> :class:`Sample` (token ids with vision placeholders, pixel rows, grids).

    Args:
        processor: the model's tokenizer and image settings.
        side: see the module docstring.
        where: the item's name in error messages (``texts[3]``, ``file.jsonl:17 positive``).
        root: folder that relative image paths resolve against and must stay inside (an
            :class:`~moca.data.images.ImageRoot` sets whether outside paths are allowed and the pixel bound);
            None = image paths given directly by a caller, used as given.
        instruction: text put before the side (None or "" = none).
        add_eos: end with ``<|endoftext|>`` (the embedder's ``append_eos`` or ``eos`` pooling).
        max_length: keep at most this many tokens (the official code truncates at 1280); an image that the
            limit cuts is dropped whole (its tokens and pixel rows), and so are the images after it. None = no
            limit.
    """
    segs = side_segments(side, where)
    if instruction:
        segs = [{"text": instruction}] + segs
    ids: List[int] = []
    rows, grids = [], []
    m2 = processor.image_spec.merge_size ** 2
    for seg in segs:
        if "text" in seg:
            ids += processor.encode_text(seg["text"], where)
            continue
        img = seg["image"]
        if isinstance(img, EncodedImage) or not _is_pil(img):     # a path, or bytes kept encoded
            img = load_record_image(img, root, processor.image_spec, where)
        try:
            px, grid = preprocess_image(img, processor.image_spec)
        except ValueError as exc:
            raise BadRecord(where, f"image cannot be used ({exc})", "bad_image_size") from exc
        rows.append(px)
        grids.append(grid)
        ids += [processor.ids["vision_start"]] + [processor.ids["image_pad"]] * (px.shape[0] // m2) + \
               [processor.ids["vision_end"]]
    if max_length is not None:
        ids, rows, grids = truncate_tokens(ids, rows, grids, max_length - int(add_eos), processor.ids["vision_start"],
                                           m2)
    if add_eos:
        ids.append(processor.ids["endoftext"])
    if not ids:
        raise BadRecord(where, "gave no tokens", "empty")
    return Sample(torch.tensor(ids, dtype=torch.long), torch.cat(rows) if rows else None,
                  torch.tensor(grids, dtype=torch.long) if grids else None, where)


# ------------------------------------------------------------------------------------------------------------
# Stage 2 pair data
# ------------------------------------------------------------------------------------------------------------


@dataclass
class SubsetConfig:
    """One Stage 2 subset (task): its files, sampling weight and instruction templates.

    ``query_instruction`` / ``doc_instruction`` are put before every query / document (positive and negatives)
    of the subset, e.g. ``"Find an image that matches the given caption: "``. A record may carry its own
    ``"instruction"`` (for its query), which wins.

    ``format``: ``moca`` (our pair records, above) or ``pairs`` (MoCa-CL-Pairs / mmE5 / MMEB-train rows:
    ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``, ``neg_text``, ``neg_image_path``;
    :func:`moca.data.published.pair_record`), with image paths relative to ``image_root`` (default: the
    file's folder). Files may be JSONL or parquet.
    """

    name: str = ""
    files: List[str] = field(default_factory=list)
    weight: float = 1.0
    query_instruction: str = ""
    doc_instruction: str = ""
    format: str = "moca"
    image_root: Optional[str] = None     # relative image paths resolve here (default: each file's own folder)
    max_records: Optional[int] = None     # use the first n records (the official recipe: 50000 per subset)

    def __post_init__(self):
        if not self.name:
            raise ValueError("a subset needs a name")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise FileNotFoundError(f"subset {self.name}: image_root {self.image_root} is not a directory")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(f"subset {self.name}: max_records must be >= 1 or null, got {self.max_records}")
        if self.format not in ("moca", "pairs"):
            raise ValueError(f"subset {self.name}: format must be 'moca' or 'pairs', got {self.format!r}")
        if not self.files:
            raise ValueError(f"subset {self.name}: no files")
        if not self.weight > 0:
            raise ValueError(f"subset {self.name}: weight must be > 0, got {self.weight}")


@dataclass
class PairBatch:
    """One local contrastive batch: B queries, then documents laid out for ``mk.info_nce``.

    Attributes:
        queries: B samples.
        docs: B positives (query i's at row i), then ``hard_negatives`` per query (query i's at rows
            B + i k ... B + i k + k - 1).
        subset: the subset's name (the same on every rank for a step).
        hard_negatives: k.
        record_ids: names of the B records.
    """

    queries: List[Sample]
    docs: List[Sample]
    subset: str
    hard_negatives: int
    record_ids: List[str]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.queries) + sum(len(s) for s in self.docs)

    def to(self, device, non_blocking: bool = False) -> "PairBatch":
        return self   # samples stay on the CPU; the trainer collates them into device batches


class PairSubset:
    """The valid records of one subset (validated once, up front, so batches never come up short).

    Bad records raise a BadRecord naming the record and the reason, or with ``skip_bad`` are counted by reason
    and left out. Checked up front: an unparsable line (not UTF-8, not JSON, nested too deeply), a missing side,
    an empty text, a vision placeholder token in a text, fewer than ``hard_negatives`` negatives, and each image
    from its header (see :func:`check_side`). Damage found only when an image is decoded is handled by the
    :class:`PairLoader` when a batch is built.

    Args:
        config: the subset.
        hard_negatives: k per query.
        skip_bad: count and leave out bad records instead of raising.
        allow_outside_paths: allow image paths outside the data folder (``../``, absolute, symlinks out).
        max_image_pixels: bound on width x height from the image header (None = none).
        spec: the model's image settings (for the shape check; None = no shape check).
    """

    def __init__(self, config: SubsetConfig, hard_negatives: int, skip_bad: bool = False,
                 allow_outside_paths: bool = False, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 spec: Optional[ImageSpec] = None, pad_negatives: bool = True):
        self.config = config
        self.records = RecordSet(config.files, image_root=config.image_root, allow_outside_paths=allow_outside_paths,
                                 max_image_pixels=max_image_pixels).limit(config.max_records)
        self.k, self.spec = hard_negatives, spec
        self.pad_negatives = pad_negatives
        self.valid: List[int] = []
        self.skipped: Counter = Counter()
        for i in range(len(self.records)):
            try:
                self._check(i)
                self.valid.append(i)
            except BadRecord as exc:
                if not skip_bad:
                    raise BadRecord(exc.record_id, str(exc).split(": ", 1)[-1] +
                                    " (set data.skip_bad: true to count and skip such records)", exc.reason) from exc
                self.skipped[exc.reason] += 1
                _warn_skip(f"subset {config.name}: skipping {exc}", sum(self.skipped.values()))
        if not self.valid:
            raise ValueError(f"subset {config.name}: no usable record (skipped: {dict(self.skipped)})")

    def __len__(self) -> int:
        return len(self.valid)

    def _record(self, i: int):
        """(record in our pair form, record id, :class:`~moca.data.images.ImageRoot`) of raw record i (converted
        from ``format``; a ``pairs`` row's image paths are joined to the root and confined to it there)."""
        rec, rid, root = self.records.get(i)
        if not isinstance(rec, dict):
            raise BadRecord(rid, f"expected a JSON object, got {type(rec).__name__}", "malformed")
        if self.config.format == "pairs":
            from .published import pair_record

            try:
                rec = pair_record(rec, root, rid)
            except ValueError as exc:
                reason = exc.reason if isinstance(exc, ImageError) else "malformed"
                raise BadRecord(rid, str(exc).removeprefix(f"{rid}: ").removeprefix(f"{rid} "), reason) from exc
        return rec, rid, root

    def _negatives(self, rec: dict) -> list:
        """The record's first k negatives; fewer than k are padded by repeating the last (the official rule)
        when ``pad_negatives``."""
        negs = list(rec.get("negatives", []) or [])
        if self.pad_negatives and 0 < len(negs) < self.k:
            negs += [negs[-1]] * (self.k - len(negs))
        return negs[:self.k]

    def _check(self, i: int) -> None:
        rec, rid, root = self._record(i)
        for key in SIDE_KEYS:
            if key not in rec:
                raise BadRecord(rid, f"has no '{key}'", "malformed")
            check_side(rec[key], f"{rid} {key}", root, self.spec)
        ins = rec.get("instruction")
        if ins is not None and not isinstance(ins, str):
            raise BadRecord(rid, f"'instruction' must be a string, got {type(ins).__name__}", "malformed")
        if ins:
            check_side(ins, f"{rid} instruction", root)
        negs = rec.get("negatives", []) or []
        if not isinstance(negs, list):
            raise BadRecord(rid, "'negatives' must be a list of sides", "malformed")
        if len(self._negatives(rec)) < self.k:
            raise BadRecord(rid, f"has {len(negs)} hard negatives, the run uses {self.k} per query" +
                            ("" if self.pad_negatives else " (data.pad_negatives: true repeats the last one)"),
                            "few_negatives")
        for j, n in enumerate(self._negatives(rec)):
            check_side(n, f"{rid} negatives[{j}]", root, self.spec)

    def samples(self, j: int, processor: MocaProcessor, add_eos: bool = True,
                max_length: Optional[int] = None) -> Tuple[Sample, List[Sample], str]:
        """(query sample, [positive, negatives...] samples, record id) of the j-th valid record."""
        rec, rid, root = self._record(self.valid[j])
        c = self.config
        q_ins = rec.get("instruction", c.query_instruction)
        q = build_sample(processor, rec["query"], f"{rid} query", root, q_ins, add_eos, max_length)
        docs = [build_sample(processor, rec["positive"], f"{rid} positive", root, c.doc_instruction, add_eos,
                             max_length)]
        docs += [build_sample(processor, n, f"{rid} negatives[{i}]", root, c.doc_instruction, add_eos, max_length)
                 for i, n in enumerate(self._negatives(rec))]
        return q, docs, rid


def _warn_skip(message: str, n: int) -> None:
    """Name the first WARN_FIRST skipped records in a warning each, the rest at DEBUG level."""
    if n < WARN_FIRST:
        log.warning(message)
    elif n == WARN_FIRST:
        log.warning(message + f" (the first {WARN_FIRST} bad records are named; later ones are counted, and logged at "
                              "DEBUG level by logger moca.data)")
    else:
        log.debug(message)


class PairLoader:
    """Stage 2 micro-batches: each from one subset (chosen by a :class:`TaskBatchSampler`), this rank's share.

    Args:
        subsets: subset configs (their weights are the sampling weights).
        processor: the model's processor.
        global_batch_size: queries per step over all ranks (each rank gets ``global_batch_size / world_size``).
        hard_negatives: k per query (0 = in-batch negatives only).
        seed, rank, world_size, shuffle: see the sampler.
        skip_bad: count and leave out bad records instead of raising.
        add_eos: end every side with ``<|endoftext|>`` (the embedder's ``append_eos``; False for last-token
            pooling without it).
        allow_outside_paths, max_image_pixels: see :class:`PairSubset`.
        pad_negatives: a record with fewer than ``hard_negatives`` (but at least one) is padded by repeating
            its last negative, as the official MoCa loader does; False rejects it (``few_negatives``).
        max_length: truncate every side at this many tokens (official: 1280; None = no limit; see
            :func:`build_sample`).

    The state (``state_dict``) is the sampler's position and the records found bad while building batches: a
    resumed run continues with the same batches.

    A record that passed the up-front checks but fails while its batch is built (an image truncated after its
    header, a file changed since) raises naming it, or with ``skip_bad`` is counted once, remembered, and
    replaced in this batch by a stand-in from the same subset. The stand-ins of a step are a pure function of
    (seed, step, position in the global batch) and never in the step's global batch; each position starts at its
    own place in a seeded list of the other records, so the stand-ins of different ranks differ without any
    communication (when the subset has at least a global batch of records outside the batch).
    """

    def __init__(self, subsets: Sequence[SubsetConfig], processor: MocaProcessor, global_batch_size: int,
                 hard_negatives: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 skip_bad: bool = False, add_eos: bool = True, allow_outside_paths: bool = False,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, pad_negatives: bool = True,
                 max_length: Optional[int] = None):
        if not subsets:
            raise ValueError("PairLoader: no subsets")
        names = [s.name for s in subsets]
        if len(set(names)) != len(names):
            raise ValueError(f"PairLoader: subset names must be unique, got {names}")
        self.subsets = [PairSubset(s, hard_negatives, skip_bad, allow_outside_paths, max_image_pixels,
                                   processor.image_spec, pad_negatives) for s in subsets]
        self.processor, self.k, self.add_eos, self.skip_bad = processor, hard_negatives, add_eos, skip_bad
        self.max_length = max_length
        self.seed, self.rank = seed, rank
        self.sampler = TaskBatchSampler([len(s) for s in self.subsets], [s.weight for s in subsets],
                                        global_batch_size, world_size=world_size, rank=rank, seed=seed,
                                        shuffle=shuffle, names=names)
        self.checked: Counter = Counter()          # found by the up-front checks (the same on every rank)
        for s in self.subsets:
            self.checked.update(s.skipped)
        self.bad: List[dict] = [{} for _ in self.subsets]   # per subset: valid index -> reason, found in batches

    @property
    def skipped(self) -> Counter:
        """Bad records by reason, each counted once. The up-front counts are reported by rank 0 only (every rank
        checks every record), so a sum over ranks counts each record once; records found bad while building
        batches are counted by the rank that met them."""
        out = Counter(self.checked) if self.rank == 0 else Counter()
        for bad in self.bad:
            out.update(bad.values())
        return out

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "skipped": dict(self.skipped),
                "bad": {s.config.name: {str(j): r for j, r in sorted(b.items())} for s, b in zip(self.subsets, self.bad)}}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        saved = state.get("bad", {})
        self.bad = [{int(j): r for j, r in saved.get(s.config.name, {}).items()} for s in self.subsets]

    def _record(self, draw, s: int, pos: int, j: int, used: set):
        """(query, docs, record id) for global batch position ``pos``: record j, or its stand-in (see above)."""
        sub, bad = self.subsets[s], self.bad[s]
        G = self.sampler.global_batch_size
        standins, tries, start = None, 0, 0
        while True:
            if j not in bad:
                try:
                    return sub.samples(j, self.processor, self.add_eos, self.max_length)
                except BadRecord as exc:
                    if not self.skip_bad:
                        raise BadRecord(exc.record_id, str(exc).split(": ", 1)[-1] +
                                        " (set data.skip_bad: true to count and skip such records)", exc.reason) from exc
                    bad[j] = exc.reason
                    _warn_skip(f"subset {sub.config.name}: skipping {exc}; a stand-in takes its place in this batch",
                               sum(self.skipped.values()))
            if standins is None:
                taken = set(draw.global_indices)
                standins = [i for i in range(len(sub)) if i not in taken]
                random.Random(f"{self.seed}/standin/{draw.step}").shuffle(standins)
                start = pos * max(1, len(standins) // G)
            while tries < len(standins) and (standins[(start + tries) % len(standins)] in bad or
                                             standins[(start + tries) % len(standins)] in used):
                tries += 1
            if tries >= len(standins):
                raise RuntimeError(f"subset {sub.config.name}: too many bad records to fill a batch of {G} at step "
                                   f"{draw.step} (skipped: {dict(self.skipped)})")
            j = standins[(start + tries) % len(standins)]
            tries += 1
            used.add(j)

    def next_micro_batch(self) -> PairBatch:
        draw = self.sampler.next()
        sub = self.subsets[draw.subset]
        b = self.sampler.local_batch_size
        queries, positives, negatives, ids = [], [], [], []
        used: set = set()                            # stand-ins taken in this batch
        for n, j in enumerate(draw.indices):
            q, docs, rid = self._record(draw, draw.subset, self.rank * b + n, j, used)
            queries.append(q)
            positives.append(docs[0])
            negatives += docs[1:]
            ids.append(rid)
        return PairBatch(queries, positives + negatives, sub.config.name, self.k, ids)


def write_jsonl(path: Union[str, Path], records: Sequence[dict]) -> Path:
    """Write records as JSON lines (used by the embedded data writers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Union[str, Path]) -> List[dict]:
    """All records of a JSONL file. A line that is not UTF-8, not JSON or nested more than 64 levels raises
    a ValueError (:class:`BadRecord`) naming the file, the line and the cause."""
    path = Path(path)
    return [parse_record_line(line, f"{path}:{n}") for n, line in read_lines(path)]


__all__ = ["side_segments", "check_side", "build_sample", "SubsetConfig", "PairBatch", "PairSubset", "PairLoader",
           "write_jsonl", "read_jsonl"]
