"""Streaming records for Stage 1: sharded JSONL / parquet read lazily, memory independent of the dataset's size.

A **source** is a folder, glob or list of shards (``.jsonl`` / ``.json`` / ``.parquet``) with a record format, a
sampling weight and an optional per-epoch cap. Each source is cut into **chunks** at start-up from file metadata
only (no record is read): a parquet row group (``pyarrow``'s footer; a row group is split into row ranges when a
source has few of them) or a byte range of a JSONL file (a chunk owns the lines that *start* inside it).

Order and sharding (all pure functions of the seed; no communication between processes):

* the records are read by ``S = world_size x max(num_workers, 1)`` **readers**; reader ``g = rank * K + worker``;
* per source and epoch, the chunks are permuted (``seed/source/epoch``) and reader g takes chunks ``g::S``; the
  rows of a chunk are permuted too (``seed/source/epoch/chunk``). So one epoch of a source hands every record to
  exactly one reader: nothing is lost or repeated, and each reader reads only its own chunks (1/S of the bytes);
* a reader's i-th record comes from the source drawn by ``random.Random(f"{seed}/mix/{g}/{i}")`` with probability
  proportional to the weights; a source that runs out of chunks starts its next epoch (a new permutation) on its
  own. A cap (``max_samples``) ends a source's epoch on reader g after its share of the cap
  (``max_samples // S``, one more for the first ``max_samples % S`` readers): an epoch of a capped source hands
  out ``max_samples`` records;
* the position of a reader is a small dict (per source: epoch, chunk, row, records taken; the draw counter; counts
  per source and per skip reason), plain JSON data. One chunk per source per reader is held in memory;
* a bad record (malformed, no text, missing image, too long) raises naming ``source/shard:row``, or with
  ``skip_bad`` is skipped every time and counted on its source's first pass only (so once; a capped source's
  records first met in a later pass are skipped uncounted).

:class:`StreamLoader` packs each reader's samples into micro-batches under the token budget (the sample that
does not fit is the next micro-batch's first, so a saved position points at it) and, with ``num_workers > 0``,
runs the readers in ``torch.utils.data.DataLoader`` worker processes, handing out their micro-batches round-robin.
Its state holds every reader's position and which reader is next: a resumed run sees exactly the micro-batches an
uninterrupted run would. A state saved with another world size or worker count is refused (the reader layout
would differ). See docs/data.md for why this is built on ``pyarrow`` rather than ``datasets`` streaming.

Record formats: :data:`FORMATS` maps a source's ``format`` to ``fn(raw, where) -> record dict`` (``raw``: a JSONL
line as the ``bytes`` read from the shard, or a parquet row as ``dict``); ``moca`` is moca's own JSONL / parquet
layout (lines parsed by :func:`moca.data.loader.parse_record_line`: not UTF-8, not JSON or nested more than
``MAX_NESTING`` levels is a bad record), ``moca_pretrain`` MoCa's published pre-training rows (``text`` with Qwen's
image placeholders, ``images`` as bytes; :func:`moca.data.published.pretrain_record`). Other readers plug in with
:func:`register_format`.

Images: a record's relative image paths resolve against ``image_root`` (default: its shard's folder) and must stay
inside it unless ``allow_outside_paths``; every image, a path or bytes, is bounded by ``max_image_pixels`` from its
header (an :class:`~moca.data.images.ImageRoot` per shard, handed to the processor). ``max_length`` truncates each
sample (:func:`~moca.data.processor.truncate_sample`) before the token budget is checked.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch.utils.data as tud

from .batch import Sample
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageRoot
from .loader import MAX_NESTING, MicroBatchPacker, _too_deep, count_skipped, parse_record_line, refuse_bad
from .processor import BadRecord, MocaProcessor, truncate_sample

log = logging.getLogger("moca.data")

SUFFIXES = (".jsonl", ".json", ".parquet")


# ------------------------------------------------------------------------------------------------------------
# Formats
# ------------------------------------------------------------------------------------------------------------


def moca_record(raw, where: str) -> dict:
    """moca's own layout: a JSON object per JSONL line (``bytes`` or ``str``, parsed by
    :func:`~moca.data.loader.parse_record_line`), or a parquet row (``content`` a list or its JSON string).
    Raises :class:`BadRecord` (``malformed``) naming ``where`` for bad UTF-8, bad JSON or too deep nesting."""
    if isinstance(raw, (bytes, str)):
        return parse_record_line(raw, where)
    rec = raw
    if isinstance(rec.get("content"), str):      # parquet: the segment list as a JSON string
        try:
            rec = dict(rec, content=parse_record_line(rec["content"], where))
        except BadRecord as exc:
            raise BadRecord(where, "'content' " + str(exc).removeprefix(f"record {where}: "), exc.reason) from exc
    elif _too_deep(rec):
        raise BadRecord(where, f"is nested more than {MAX_NESTING} levels deep", "malformed")
    return rec


def moca_pretrain_record(raw, where: str) -> dict:
    """MoCa's published pre-training rows (``text`` with ``<|vision_start|><|image_pad|><|vision_end|>`` where each
    image goes, ``images`` as bytes) -> ``{"content": [...]}`` with :class:`~moca.data.published.EncodedImage`
    segments (decoded later through :func:`~moca.data.images.open_image_bytes`); a row that cannot be converted
    is a :class:`BadRecord` (``malformed``) naming ``where``."""
    from .published import pretrain_record

    rec = moca_record(raw, where)
    if not isinstance(rec, dict):
        return rec                   # the processor names it: expected a JSON object
    try:
        return pretrain_record(rec, where)
    except ValueError as exc:
        raise BadRecord(where, str(exc).removeprefix(f"{where}: ").removeprefix(f"{where} "), "malformed") from exc


FORMATS: Dict[str, Callable[[object, str], dict]] = {"moca": moca_record, "moca_pretrain": moca_pretrain_record}


def register_format(name: str, fn: Callable[[object, str], dict]) -> None:
    """Make ``format: name`` in ``data.sources`` convert raw rows/lines with ``fn(raw, where) -> record``."""
    FORMATS[name] = fn


# ------------------------------------------------------------------------------------------------------------
# Sources and chunks
# ------------------------------------------------------------------------------------------------------------


@dataclass
class SourceConfig:
    """One entry of ``data.sources``.

    ``path``: a folder (its ``*.jsonl`` / ``*.json`` / ``*.parquet`` files, recursively), a glob, a file, or a list
    of those. ``weight`` > 0: the source's share of the records drawn. ``max_samples``: records per epoch (None =
    all). ``format``: a key of :data:`FORMATS` (None = the loader's default format: ``data.format`` in Stage 1,
    ``moca`` unless set).
    """

    name: str = ""
    path: Union[str, List[str]] = ""
    format: Optional[str] = None
    weight: float = 1.0
    max_samples: Optional[int] = None

    def __post_init__(self):
        where = f"data.sources[{self.name or '?'}]"
        if not self.name:
            raise ValueError(f"{where}: every source needs a name")
        if not self.path:
            raise ValueError(f"{where}: path is empty")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"{where}: weight must be > 0, got {self.weight!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"{where}: max_samples must be >= 1 or null, got {self.max_samples}")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"{where}: unknown format {self.format!r}; known: {sorted(FORMATS)}")


def expand_paths(path: Union[str, Path, Sequence[Union[str, Path]]], where: str = "data") -> List[Path]:
    """Shard files of a folder / glob / file / list of those, sorted within each entry, in the given order."""
    entries = [path] if isinstance(path, (str, Path)) else list(path)
    out: List[Path] = []
    for e in entries:
        p = Path(e)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in SUFFIXES and q.is_file())
        elif p.is_file():
            found = [p]
        elif any(c in str(e) for c in "*?["):
            found = sorted(Path(q) for q in glob.glob(str(e), recursive=True) if Path(q).suffix in SUFFIXES)
        else:
            raise FileNotFoundError(f"{where}: data file {p} does not exist")
        if not found:
            raise FileNotFoundError(f"{where}: no .jsonl / .json / .parquet files in {e}")
        out += found
    return out


# A chunk: (file index, row group (-1 for JSONL), start, stop): JSONL byte range, or row range in the row group.
Chunk = Tuple[int, int, int, int]


class Source:
    """A source's shards cut into chunks from metadata (file sizes, parquet footers)."""

    def __init__(self, cfg: SourceConfig, readers: int, chunk_bytes: int = 4 << 20,
                 image_root: Optional[Union[str, Path]] = None, allow_outside_paths: bool = False,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS, default_format: str = "moca"):
        self.cfg, self.name = cfg, cfg.name
        self.files = expand_paths(cfg.path, f"data.sources[{cfg.name}]")
        fmt = cfg.format or default_format
        if fmt not in FORMATS:
            raise ValueError(f"data.sources[{cfg.name}]: unknown format {fmt!r}; known: {sorted(FORMATS)}")
        self.convert = FORMATS[fmt]
        if image_root is not None and not Path(image_root).is_dir():
            raise FileNotFoundError(f"data.sources[{cfg.name}]: image root {image_root} is not a directory")
        self.image_root, self.allow_outside_paths = image_root, allow_outside_paths
        self.max_image_pixels = max_image_pixels
        self._roots: Dict[int, ImageRoot] = {}
        jsonl_bytes = sum(f.stat().st_size for f in self.files if f.suffix != ".parquet")
        # enough JSONL chunks for every reader to get several (small data), at most chunk_bytes each
        cb = max(1, min(chunk_bytes, jsonl_bytes // max(1, 4 * readers)))
        groups: List[Tuple[int, int, int]] = []           # parquet (file, row group, rows)
        self.chunks: List[Chunk] = []
        for fi, f in enumerate(self.files):
            if f.suffix == ".parquet":
                groups += [(fi, rg, n) for rg, n in enumerate(_row_group_sizes(f)) if n > 0]
            else:
                size = f.stat().st_size
                self.chunks += [(fi, -1, a, min(a + cb, size)) for a in range(0, size, cb)]
        parts = max(1, math.ceil(4 * readers / len(groups))) if groups else 1
        for fi, rg, n in groups:
            k = min(parts, n)
            self.chunks += [(fi, rg, n * j // k, n * (j + 1) // k) for j in range(k)]
        if len(self.chunks) < readers:
            raise ValueError(f"data.sources[{self.name}]: {len(self.chunks)} chunks for {readers} readers "
                             f"(processes x DataLoader workers); give it more shards or fewer workers")

    def read_chunk(self, c: Chunk) -> List[Tuple[object, int]]:
        """Raw rows of chunk ``c`` with their position: (line bytes, byte offset) for JSONL, (row dict, row number)."""
        fi, rg, a, b = c
        f = self.files[fi]
        if rg >= 0:
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(f).read_row_group(rg).slice(a, b - a).to_pylist()
            first = sum(_row_group_sizes(f)[:rg]) + a + 1
            return [(r, first + i) for i, r in enumerate(rows)]
        out = []
        with open(f, "rb") as fh:
            if a > 0:
                fh.seek(a - 1)
                fh.readline()             # the line that started before a belongs to the previous chunk
            pos = fh.tell()
            while pos < b:
                line = fh.readline()
                if not line:
                    break
                text = line[3:] if pos == 0 and line.startswith(b"\xef\xbb\xbf") else line   # a byte order mark
                if text.strip():
                    out.append((text, pos))
                pos += len(line)
        return out

    def root_of(self, fi: int) -> ImageRoot:
        """The :class:`~moca.data.images.ImageRoot` of shard ``fi``'s records: ``image_root`` or the shard's
        folder, with the confinement and pixel-bound settings."""
        if fi not in self._roots:
            folder = Path(self.image_root) if self.image_root is not None else self.files[fi].parent
            self._roots[fi] = ImageRoot(folder, self.allow_outside_paths, self.max_image_pixels)
        return self._roots[fi]

    def where(self, fi: int, rg: int, pos: int, exact: bool = True) -> str:
        """'source/shard:row': the parquet row number, or the JSONL line number (``exact``; counted by reading the
        file up to the line, so only done when a record is named in an error) / ``@byte`` offset (not ``exact``)."""
        f = self.files[fi]
        if rg < 0:
            if not exact:
                return f"{self.name}/{f.name}@{pos}"
            with open(f, "rb") as fh:
                pos = fh.read(pos).count(b"\n") + 1
        return f"{self.name}/{f.name}:{pos}"


_RG_CACHE: Dict[tuple, List[int]] = {}


def _row_group_sizes(f: Path) -> List[int]:
    st = f.stat()
    key = (str(f), st.st_size, st.st_mtime_ns)
    if key not in _RG_CACHE:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"reading {f} needs pyarrow (pip install pyarrow), or convert it to JSONL") from exc
        md = pq.ParquetFile(f).metadata
        _RG_CACHE[key] = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    return _RG_CACHE[key]


# ------------------------------------------------------------------------------------------------------------
# One reader: a mixture of sources, a resumable position
# ------------------------------------------------------------------------------------------------------------


class ReaderStream:
    """Reader ``g`` of ``S``: raw records from a weighted mixture of sources (see the module docstring).

    ``next()`` returns ``(raw record, where, source index)``; ``state_dict()`` is the position of the next one.
    """

    def __init__(self, sources: Sequence[Source], g: int, S: int, seed: int = 0, shuffle: bool = True):
        self.sources, self.g, self.S, self.seed, self.shuffle = list(sources), g, S, seed, shuffle
        total = sum(s.cfg.weight for s in self.sources)
        self.probs = [s.cfg.weight / total for s in self.sources]
        self.pos = [[0, 0, 0, 0] for _ in self.sources]          # per source: epoch, chunk, row, taken this epoch
        self.draws = 0
        self.counts = [0] * len(self.sources)
        self._chunks: Dict[int, Tuple[int, List[Chunk]]] = {}   # source -> (epoch, my chunks)
        self._rows: Dict[int, Tuple[Tuple[int, int], List]] = {}  # source -> ((epoch, chunk), rows in order)

    def state_dict(self) -> dict:
        return {"pos": [list(p) for p in self.pos], "draws": self.draws, "counts": list(self.counts)}

    def load_state_dict(self, st: dict) -> None:
        if len(st["pos"]) != len(self.sources):
            raise ValueError(f"data state has {len(st['pos'])} sources, this run has {len(self.sources)}")
        self.pos = [[int(x) for x in p] for p in st["pos"]]
        self.draws, self.counts = int(st["draws"]), [int(c) for c in st["counts"]]

    def _quota(self, si: int) -> Optional[int]:
        cap = self.sources[si].cfg.max_samples
        return None if cap is None else cap // self.S + (1 if self.g < cap % self.S else 0)

    def _my_chunks(self, si: int, epoch: int) -> List[Chunk]:
        got = self._chunks.get(si)
        if got is None or got[0] != epoch:
            src = self.sources[si]
            order = list(range(len(src.chunks)))
            if self.shuffle:
                random.Random(f"{self.seed}/{src.name}/{epoch}").shuffle(order)
            got = (epoch, [src.chunks[i] for i in order[self.g::self.S]])
            self._chunks[si] = got
        return got[1]

    def _chunk_rows(self, si: int, epoch: int, ci: int, chunk: Chunk) -> List:
        got = self._rows.get(si)
        if got is None or got[0] != (epoch, ci):
            rows = self.sources[si].read_chunk(chunk)
            if self.shuffle:
                random.Random(f"{self.seed}/{self.sources[si].name}/{epoch}/{chunk}").shuffle(rows)
            got = ((epoch, ci), rows)
            self._rows[si] = got
        return got[1]

    def _pick(self) -> int:
        if len(self.sources) == 1:
            return 0
        return random.Random(f"{self.seed}/mix/{self.g}/{self.draws}").choices(range(len(self.sources)),
                                                                              weights=self.probs)[0]

    def next(self) -> Tuple[object, Tuple[int, int, int], int]:
        """(raw record, (file index, row group, position) for naming it, source index); advances."""
        si = self._pick()
        p = self.pos[si]
        empty_epochs = 0
        while True:
            epoch, ci, ri, taken = p
            chunks = self._my_chunks(si, epoch)
            quota = self._quota(si)
            if ci >= len(chunks) or (quota is not None and taken >= quota):
                empty_epochs = empty_epochs + 1 if taken == 0 else 0
                if empty_epochs > 1:
                    raise ValueError(f"data.sources[{self.sources[si].name}]: reader {self.g} of {self.S} got no "
                                     f"record in a whole epoch (too few records for the processes x workers)")
                p[:] = [epoch + 1, 0, 0, 0]
                continue
            rows = self._chunk_rows(si, epoch, ci, chunks[ci])
            if ri >= len(rows):
                p[:] = [epoch, ci + 1, 0, taken]
                continue
            raw, pos = rows[ri]
            p[:] = [epoch, ci, ri + 1, taken + 1]
            self.draws += 1
            self.counts[si] += 1
            return raw, (chunks[ci][0], chunks[ci][1], pos), si

    def record(self, raw, loc: Tuple[int, int, int], si: int, exact: bool = False) -> Tuple[dict, str, ImageRoot]:
        """(record dict, record id naming source/shard:row, :class:`~moca.data.images.ImageRoot` for its images).

        A JSONL record's id carries its byte offset (``shard@123``) unless ``exact``: its line (``shard:7``);
        a :class:`BadRecord` raised here or by the processor is renamed with the line by :meth:`name`."""
        src = self.sources[si]
        fi, rg, pos = loc
        where = src.where(fi, rg, pos, exact)
        rec = src.convert(raw, where)
        rid = f"{rec.get('id')} ({where})" if isinstance(rec, dict) and rec.get("id") is not None else where
        return rec, rid, src.root_of(fi)

    def name(self, raw, loc: Tuple[int, int, int], si: int) -> str:
        """The exact id of a record (its JSONL line number; for error messages)."""
        try:
            return self.record(raw, loc, si, exact=True)[1]
        except BadRecord:
            return self.sources[si].where(*loc)


# ------------------------------------------------------------------------------------------------------------
# Packing one reader's samples
# ------------------------------------------------------------------------------------------------------------


class ReaderPacker(MicroBatchPacker):
    """Micro-batches of one reader under the token budget; its state points at the first sample not yet handed out."""

    def __init__(self, stream: ReaderStream, processor: MocaProcessor, token_budget: int, skip_bad: bool = False,
                 max_samples: Optional[int] = None, max_length: Optional[int] = None):
        self.stream, self.processor = stream, processor
        self.token_budget, self.skip_bad, self.max_samples = token_budget, skip_bad, max_samples
        self.max_length = max_length
        self.skipped: Counter = Counter()
        self.micro_batches = 0
        self._pending: Optional[Tuple[dict, Sample]] = None       # (stream state before it, sample)

    def state_dict(self) -> dict:
        st = self._pending[0] if self._pending is not None else self.stream.state_dict()
        return {"stream": st, "skipped": dict(self.skipped), "micro_batches": self.micro_batches}

    def load_state_dict(self, st: dict) -> None:
        self.stream.load_state_dict(st["stream"])
        self.skipped = Counter(st.get("skipped", {}))
        self.micro_batches = int(st.get("micro_batches", 0))
        self._pending = None

    def _next_sample(self) -> Tuple[dict, Sample]:
        bad_in_a_row = 0
        while True:
            before = self.stream.state_dict()
            raw, loc, si = self.stream.next()
            try:
                try:
                    rec, rid, root = self.stream.record(raw, loc, si)
                    sample = self.processor.process(rec, rid, root)
                except RecursionError as rexc:   # a structure deep enough to overflow the stack in processing
                    raise BadRecord(self.stream.sources[si].where(*loc), "is nested too deeply to process",
                                    "malformed") from rexc
                if self.max_length is not None:
                    sample = truncate_sample(sample, self.max_length, self.processor.ids,
                                             self.processor.image_spec.merge_size)
                if len(sample) > self.token_budget:
                    raise BadRecord(rid, f"is {len(sample)} tokens long, more than the token budget "
                                         f"({self.token_budget})", "too_long")
                return before, sample
            except BadRecord as exc:
                exact = self.stream.name(raw, loc, si)
                if exact != exc.record_id:
                    exc = BadRecord(exact, str(exc).split(": ", 1)[-1], exc.reason)
                refuse_bad(exc, self.skip_bad)
                if self.stream.pos[si][0] == 0:      # counted on the source's first pass only: once each
                    count_skipped(self.skipped, exc)
                bad_in_a_row += 1
                if bad_in_a_row > 10000:
                    raise RuntimeError(f"10000 bad records in a row (skipped: {dict(self.skipped)})") from exc



# ------------------------------------------------------------------------------------------------------------
# The loader: readers in this process or in DataLoader workers
# ------------------------------------------------------------------------------------------------------------


class _WorkerStream:
    """torch IterableDataset body: worker w runs reader ``rank * K + (w + offset) % K`` from its saved state."""

    def __init__(self, loader: "StreamLoader", states: List[Optional[dict]], offset: int):
        self.loader, self.states, self.offset = loader, states, offset

    def __iter__(self):
        info = tud.get_worker_info()
        k = (info.id + self.offset) % self.loader.num_workers
        packer = self.loader._packer(k)
        if self.states[k] is not None:
            packer.load_state_dict(self.states[k])
        while True:
            try:
                batch = packer.next_micro_batch()
            except BadRecord as exc:     # re-raised as BadRecord in the trainer (torch would wrap it)
                yield k, None, None, (exc.record_id, str(exc).split(": ", 1)[-1], exc.reason)
                return
            yield k, batch, packer.state_dict(), None


class StreamLoader:
    """Endless, resumable micro-batches (lists of :class:`Sample`) streamed from one or more sources.

    Args:
        sources: :class:`SourceConfig` entries (or dicts of their fields).
        processor: turns records into samples.
        token_budget: max tokens of one micro-batch; a longer sample is a bad record.
        seed, shuffle: the order (see the module docstring).
        rank, world_size: this process's place.
        num_workers: DataLoader worker processes reading for this process (0 = read here).
        skip_bad: count and skip bad records (named source/shard:row) instead of raising.
        max_samples: optional cap on samples per micro-batch.
        chunk_bytes: largest JSONL chunk (bytes read at once per source and reader).
        max_length: truncate each sample at this many tokens (the official recipe: 1280; an image cut by the
            limit is dropped whole); None = no truncation (a sample above the budget is a bad record).
        image_root: folder that relative image paths resolve against (default: each shard's own folder).
        allow_outside_paths: allow image paths that resolve outside that folder (default: a bad record).
        max_image_pixels: bound on an image's width x height from its header (None = none); images as bytes too.
        format: the format of sources whose ``format`` is None (``data.format``).
    """

    def __init__(self, sources: Sequence[Union[SourceConfig, dict]], processor: MocaProcessor, token_budget: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, skip_bad: bool = False,
                 shuffle: bool = True, max_samples: Optional[int] = None, chunk_bytes: int = 4 << 20,
                 max_length: Optional[int] = None, image_root: Optional[Union[str, Path]] = None,
                 allow_outside_paths: bool = False, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 format: str = "moca"):
        if token_budget < 2:
            raise ValueError(f"token_budget must be >= 2, got {token_budget}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} of world size {world_size}")
        cfgs = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in sources]
        if not cfgs:
            raise ValueError("no data sources")
        names = [c.name for c in cfgs]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: names must be unique, got {names}")
        self.processor, self.token_budget, self.seed, self.shuffle = processor, token_budget, seed, shuffle
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.skip_bad, self.max_samples, self.max_length = skip_bad, max_samples, max_length
        self.K = max(1, num_workers)
        self.S = world_size * self.K
        small = [f"{c.name} ({c.max_samples})" for c in cfgs if c.max_samples is not None and c.max_samples < self.S]
        if small:
            raise ValueError(f"data.sources: max_samples smaller than the {self.S} readers (processes x DataLoader "
                             f"workers): {', '.join(small)}")
        self.sources = [Source(c, self.S, chunk_bytes, image_root, allow_outside_paths, max_image_pixels, format)
                        for c in cfgs]
        self.names = names
        self._states: List[Optional[dict]] = [None] * self.K
        self._next = 0
        self.micro_batches = 0
        self._local: Optional[ReaderPacker] = None
        self._it = None
        self._dl = None

    def _packer(self, k: int) -> ReaderPacker:
        stream = ReaderStream(self.sources, self.rank * self.K + k, self.S, self.seed, self.shuffle)
        return ReaderPacker(stream, self.processor, self.token_budget, self.skip_bad, self.max_samples,
                            self.max_length)

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain JSON data: every reader's position, the next reader, the counts."""
        if self.num_workers == 0 and self._local is not None:
            self._states[0] = self._local.state_dict()
        skipped: Counter = Counter()
        counts = [0] * len(self.sources)
        for st in self._states:
            if st is not None:
                skipped.update(st["skipped"])
                counts = [a + b for a, b in zip(counts, st["stream"]["counts"])]
        return {"kind": "stream", "rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
                "seed": self.seed, "sources": list(self.names), "next_reader": self._next,
                "micro_batches": self.micro_batches, "readers": [None if s is None else dict(s) for s in self._states],
                "skipped": dict(skipped), "source_counts": dict(zip(self.names, counts))}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream":
            raise ValueError("data state was saved by the in-memory loader of an older moca; it cannot resume a "
                             "streaming run (start a new run, or resume with the moca version that saved it)")
        mine = {"world_size": self.world_size, "num_workers": self.num_workers, "rank": self.rank,
                "sources": list(self.names)}
        for key, val in mine.items():
            if state.get(key) != val:
                raise ValueError(f"data state was saved with {key}={state.get(key)!r}, this run has {val!r}: the "
                                 f"records are split over processes x DataLoader workers, so a run resumes only with "
                                 f"the same world size, data.num_workers and data.sources")
        self.close()
        self._states = [None if s is None else dict(s) for s in state["readers"]]
        self._next = int(state["next_reader"])
        self.micro_batches = int(state.get("micro_batches", 0))
        self._local = None

    @property
    def skipped(self) -> Counter:
        return Counter(self.state_dict()["skipped"])

    def shares(self) -> Dict[str, float]:
        """Fraction of the records read so far (by this process) that came from each source."""
        counts = self.state_dict()["source_counts"]
        total = sum(counts.values()) or 1
        return {n: c / total for n, c in counts.items()}

    # -- iteration -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop worker processes (a later call restarts them from the saved positions)."""
        self._it = None
        self._dl = None

    def next_micro_batch(self) -> List[Sample]:
        if self.num_workers == 0:
            if self._local is None:
                self._local = self._packer(0)
                if self._states[0] is not None:
                    self._local.load_state_dict(self._states[0])
            batch = self._local.next_micro_batch()
            self._states[0] = self._local.state_dict()
        else:
            if self._it is None:
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # workers are forked: no tokenizer threads
                ds = _IterDataset(_WorkerStream(self, list(self._states), self._next))
                self._dl = tud.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                          collate_fn=_identity, prefetch_factor=2)
                self._it = iter(self._dl)
            k, batch, st, bad = next(self._it)
            if bad is not None:
                self.close()
                raise BadRecord(*bad)
            if k != self._next:   # pragma: no cover - DataLoader's round-robin order is what resume relies on
                raise RuntimeError(f"DataLoader handed out reader {k}, expected {self._next}")
            self._states[k] = st
            self._next = (k + 1) % self.num_workers
        self.micro_batches += 1
        if self.micro_batches % 1000 == 0 and len(self.names) > 1:
            log.info("data source shares (rank %d): %s", self.rank,
                     ", ".join(f"{n} {v:.3f}" for n, v in self.shares().items()))
        return batch

    def __iter__(self) -> Iterator[List[Sample]]:
        while True:
            yield self.next_micro_batch()


def _identity(x):
    return x


class _IterDataset(tud.IterableDataset):
    """The DataLoader's view of :class:`_WorkerStream`."""

    def __init__(self, body: _WorkerStream):
        self.body = body

    def __iter__(self):
        return iter(self.body)
