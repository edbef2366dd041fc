"""Record files and the packing loader: a resumable stream of micro-batches under a token budget.

:class:`RecordSet` reads local JSONL (one JSON object per line) or parquet files (needs ``pyarrow``; a
``content`` column holding the segment list, or a JSON string of it). :class:`PackingLoader` walks the records
in a seeded order (a new permutation per epoch, records split across ranks), processes them into samples and
groups consecutive samples into micro-batches of at most ``token_budget`` tokens. Its position (epoch,
cursor, skip counts) is a small dict: a resumed run continues with exactly the micro-batches an uninterrupted
run would have seen.

Bad records raise an error naming the record, its file and line, and the reason, or, with ``skip_bad=True``, are
counted by reason and skipped (a warning naming each of the first 20, the totals in the loader's ``skipped`` dict
and the training logs). A record is counted once, however many epochs meet it again (the indices of the bad
records found so far are part of the loader state). Bad: a line that is not UTF-8 or not JSON or nested more
than 64 levels, no text, a vision placeholder token in the text, longer than the budget, and an image that is
missing, outside the data folder (see :func:`moca.data.images.resolve_image_path`), not an image, larger than
``max_image_pixels`` (checked from its header, before decoding), of a shape Qwen's resize rule refuses (aspect
ratio above 200), or truncated / corrupt.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .batch import Sample
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageRoot
from .processor import BadRecord, MocaProcessor, truncate_sample

log = logging.getLogger("moca.data")


MAX_NESTING = 64
"""Records nested deeper than this (lists / objects inside each other) are bad records: no record format needs
it, and deeper structures overflow Python's recursion limit in the JSON parser and in whatever walks them."""


def _too_deep(obj, limit: int = MAX_NESTING) -> bool:
    stack = [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            x = list(x.values())
        elif not isinstance(x, list):
            continue
        if d > limit:
            return True
        stack += [(v, d + 1) for v in x if isinstance(v, (dict, list))]
    return False


def parse_record_line(raw: Union[str, bytes], where: str):
    """One JSONL line (bytes as read from the file, or str) -> the parsed value.

    Raises :class:`BadRecord` (reason ``malformed``) naming ``where`` (``file.jsonl:17``) for a line that is not
    UTF-8 (the byte and its column), not JSON, or nested deeper than :data:`MAX_NESTING`.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRecord(where, f"is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                            "malformed") from exc
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadRecord(where, f"is not valid JSON ({exc.msg}, column {exc.colno})", "malformed") from exc
    except RecursionError as exc:
        raise BadRecord(where, f"is nested too deeply to parse (more than {MAX_NESTING} levels)", "malformed") from exc
    if _too_deep(rec):
        raise BadRecord(where, f"is nested more than {MAX_NESTING} levels deep", "malformed")
    return rec


def read_lines(path: Path) -> Iterator[Tuple[int, bytes]]:
    """(line number, raw bytes) of each non-blank line; decoding is per line (a bad byte spoils one line only)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):      # a UTF-8 byte order mark
                line = line[3:]
            if line.strip():
                yield n, line


class _ParquetRows:
    """Row access into one parquet file, one row group at a time (the last two row groups read are kept)."""

    def __init__(self, path: Path):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to JSONL") from exc
        self.path = path
        md = pq.ParquetFile(path).metadata
        self.num_rows = md.num_rows
        self.starts = [0]
        for g in range(md.num_row_groups):
            self.starts.append(self.starts[-1] + md.row_group(g).num_rows)
        self._file = None
        self._cache: Dict[int, list] = {}
        self._lock = threading.Lock()

    def __getstate__(self):          # picklable (worker processes): the open file and the cache stay behind
        return {"path": self.path, "num_rows": self.num_rows, "starts": self.starts}

    def __setstate__(self, state):
        self.__dict__.update(state, _file=None, _cache={}, _lock=threading.Lock())

    def row(self, n: int) -> dict:
        import bisect

        import pyarrow.parquet as pq

        g = bisect.bisect_right(self.starts, n) - 1
        with self._lock:
            rows = self._cache.get(g)
            if rows is None:
                if self._file is None:
                    self._file = pq.ParquetFile(self.path)
                rows = self._file.read_row_group(g).to_pylist()
                if len(self._cache) >= 2:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[g] = rows
        return dict(rows[n - self.starts[g]])


class _LazyRow:
    __slots__ = ("src", "n")

    def __init__(self, src: _ParquetRows, n: int):
        self.src, self.n = src, n


class RecordSet:
    """Records of one or more local files, kept as raw lines/rows and parsed on access.

    Args:
        paths: JSONL (``.jsonl`` / ``.json``) or parquet (``.parquet``) files, or folders of them (searched
            recursively, files in sorted order).
        format: ``moca`` (records as they are) or ``moca_pretrain`` (MoCa's published pre-training rows,
            ``text`` with ``<|vision_start|><|image_pad|><|vision_end|>`` placeholders and ``images`` as bytes,
            converted by :func:`moca.data.published.pretrain_record`; a row it cannot convert is a bad record).
        image_root: folder that relative image paths resolve against (default: each file's own folder).
        allow_outside_paths: allow image paths that resolve outside that folder (``../``, absolute paths
            elsewhere, symlinks out); by default they make the record bad.
        max_image_pixels: bound on an image's width x height, from its header (None = no bound); it applies to
            images given as bytes too.
    """

    def __init__(self, paths: Union[str, Path, Sequence[Union[str, Path]]], format: str = "moca",
                 image_root: Optional[Union[str, Path]] = None, allow_outside_paths: bool = False,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        if format not in ("moca", "moca_pretrain"):
            raise ValueError(f"data format must be 'moca' or 'moca_pretrain', got {format!r}")
        self.format = format
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if image_root is not None and not Path(image_root).is_dir():
            raise FileNotFoundError(f"image root {image_root} is not a directory")
        self.image_root, self.allow_outside_paths = image_root, allow_outside_paths
        self.max_image_pixels = max_image_pixels
        self._roots: Dict[Path, ImageRoot] = {}
        expanded: List[Path] = []
        for p in map(Path, paths):     # a folder (a downloaded dataset) stands for its parquet / JSONL files
            if p.is_dir():
                found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".parquet", ".jsonl"))
                if not found:
                    raise FileNotFoundError(f"data folder {p} holds no .parquet or .jsonl file")
                expanded += found
            else:
                expanded.append(p)
        self.items: List[Tuple[object, Path, int]] = []     # (raw, file, line/row number)
        for p in expanded:
            if not p.exists():
                raise FileNotFoundError(f"data file {p} does not exist")
            if p.suffix == ".parquet":
                self._read_parquet(p)
            else:
                self.items += [(line, p, n) for n, line in read_lines(p)]
        if not self.items:
            raise ValueError(f"no records in {', '.join(map(str, paths))}")

    def _read_parquet(self, p: Path) -> None:
        """Index the rows of a parquet file without reading them: a row is read (with its row group) on access,
        so sets holding image bytes (the published pre-training data) are not loaded into memory."""
        src = _ParquetRows(p)
        self.items += [(_LazyRow(src, n), p, n + 1) for n in range(src.num_rows)]

    def __len__(self) -> int:
        return len(self.items)

    def limit(self, n: Optional[int], seed: Optional[int] = None) -> "RecordSet":
        """Keep at most ``n`` records: the first n (``seed`` None, as the official Stage 2 caps its subsets) or
        n drawn at random with ``seed`` (as the official Stage 1 caps its sources), in file order. In place."""
        if n is not None and n < len(self.items):
            if n < 1:
                raise ValueError(f"a record cap must be >= 1, got {n}")
            if seed is None:
                self.items = self.items[:n]
            else:
                keep = sorted(random.Random(seed).sample(range(len(self.items)), n))
                self.items = [self.items[i] for i in keep]
        return self

    def extend(self, other: "RecordSet") -> "RecordSet":
        """Append another set's records (same format). In place. The image roots of ``other``'s files come
        along as ``other`` set them (its ``image_root``, ``allow_outside_paths`` and ``max_image_pixels``), so
        merging sets never loosens or moves the confinement of either."""
        if other.format != self.format:
            raise ValueError(f"cannot merge record sets of formats {self.format!r} and {other.format!r}")
        mine = set(p for _, p, _ in self.items)
        for path in dict.fromkeys(p for _, p, _ in other.items):
            root = other.root_of(path)
            if path in mine and self.root_of(path) != root:
                raise ValueError(f"cannot merge record sets reading {path} with different image settings "
                                 f"({self.root_of(path)} and {root})")
            self._roots[path] = root
        self.items += other.items
        return self

    def root_of(self, path: Path) -> ImageRoot:
        """The :class:`~moca.data.images.ImageRoot` of records from data file ``path``."""
        if path not in self._roots:
            folder = Path(self.image_root) if self.image_root is not None else path.parent
            self._roots[path] = ImageRoot(folder, self.allow_outside_paths, self.max_image_pixels)
        return self._roots[path]

    def get(self, i: int) -> Tuple[dict, str, ImageRoot]:
        """(record, record id, :class:`~moca.data.images.ImageRoot` for its image paths and bytes). Raises
        BadRecord for a line that is not UTF-8 or not JSON, a record nested too deeply, a parquet ``content``
        that is not valid JSON, or a ``moca_pretrain`` row that cannot be converted."""
        raw, path, n = self.items[i]
        where = f"{path.name}:{n}"
        if isinstance(raw, _LazyRow):
            raw = raw.src.row(raw.n)
        if isinstance(raw, (str, bytes)):
            rec = parse_record_line(raw, where)
        else:
            rec = raw
            if isinstance(rec.get("content"), str):      # parquet: the segment list as a JSON string
                try:
                    rec = dict(rec, content=parse_record_line(rec["content"], where))
                except BadRecord as exc:
                    raise BadRecord(where, "'content' " + str(exc).removeprefix(f"record {where}: "),
                                    exc.reason) from exc
            elif _too_deep(rec):
                raise BadRecord(where, f"is nested more than {MAX_NESTING} levels deep", "malformed")
        if self.format == "moca_pretrain" and isinstance(rec, dict):
            from .published import pretrain_record

            try:
                rec = pretrain_record(rec, where)
            except ValueError as exc:
                raise BadRecord(where, str(exc).removeprefix(f"{where}: ").removeprefix(f"{where} "),
                                "malformed") from exc
        rid = f"{rec.get('id')} ({where})" if isinstance(rec, dict) and rec.get("id") is not None else where
        return rec, rid, self.root_of(path)


WARN_FIRST = 20
"""Bad records named in a warning each (the first ones); later ones are logged at DEBUG level (logger
``moca.data``), all are counted."""


def refuse_bad(exc: BadRecord, skip_bad: bool) -> None:
    """Re-raise a bad record, with the setting that skips such records, unless ``skip_bad``."""
    if not skip_bad:
        raise BadRecord(exc.record_id, str(exc).split(": ", 1)[-1] +
                        " (set data.skip_bad: true to count and skip such records)", exc.reason) from exc


def count_skipped(skipped: Counter, exc: BadRecord) -> None:
    """Count a skipped bad record by reason; the first :data:`WARN_FIRST` are named in a warning each."""
    skipped[exc.reason] += 1
    n = sum(skipped.values())
    if n <= WARN_FIRST:
        log.warning("skipping %s%s", exc, "" if n < WARN_FIRST else
                    f" (the first {WARN_FIRST} bad records are named; later ones are counted, and logged "
                    "at DEBUG level by logger moca.data)")
    else:
        log.debug("skipping %s", exc)


class MicroBatchPacker:
    """Greedy packing under a token budget, shared by :class:`PackingLoader` and the streaming loader.

    The class using it provides ``_next_sample()`` (a tuple whose last element is the next usable
    :class:`Sample`), ``_pending`` (that tuple read ahead, or None), ``token_budget``, ``max_samples`` and
    ``micro_batches``."""

    def next_micro_batch(self) -> List[Sample]:
        """The next micro-batch: consecutive samples whose lengths sum to at most the token budget.

        The sample that did not fit is kept for the next call; the saved position points at it.
        """
        batch: List[Sample] = []
        used = 0
        while True:
            if self._pending is None:
                self._pending = self._next_sample()
            sample = self._pending[-1]
            full = self.max_samples is not None and len(batch) >= self.max_samples
            if batch and (used + len(sample) > self.token_budget or full):
                break
            batch.append(sample)
            used += len(sample)
            self._pending = None
        self.micro_batches += 1
        return batch


class PackingLoader(MicroBatchPacker):
    """Endless, resumable stream of micro-batches (lists of :class:`Sample`) under a token budget.

    Args:
        records: the :class:`RecordSet`.
        processor: turns records into samples.
        token_budget: max tokens of one micro-batch (a packed row); a longer sample is a bad record.
        seed: seeds the per-epoch order.
        rank, world_size: this process's share of each epoch's order (records ``rank::world_size``).
        skip_bad: count and skip bad records instead of raising.
        shuffle: permute records each epoch (else file order).
        max_samples: optional cap on samples per micro-batch.
        max_length: truncate each sample at this many tokens (the official recipe: 1280; an image cut by the
            limit is dropped whole); None = no truncation (a sample above the budget is a bad record).
    """

    def __init__(self, records: RecordSet, processor: MocaProcessor, token_budget: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, skip_bad: bool = False, shuffle: bool = True,
                 max_samples: Optional[int] = None, max_length: Optional[int] = None):
        if token_budget < 2:
            raise ValueError(f"token_budget must be >= 2, got {token_budget}")
        self.records, self.processor = records, processor
        self.token_budget, self.seed, self.rank, self.world_size = token_budget, seed, rank, world_size
        self.skip_bad, self.shuffle, self.max_samples = skip_bad, shuffle, max_samples
        self.max_length = max_length
        self.epoch, self.cursor, self.micro_batches = 0, 0, 0
        self.skipped: Counter = Counter()     # reason -> distinct bad records met (each counted once)
        self.bad: Dict[int, str] = {}         # record index -> reason, for the records found bad so far
        self._order_epoch, self._order = None, None
        self._pending: Optional[Tuple[int, int, Sample]] = None      # (epoch, cursor, sample) read ahead

    # -- order ---------------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> List[int]:
        if self._order_epoch != epoch:
            idx = list(range(len(self.records)))
            if self.shuffle:
                random.Random(self.seed * 1000003 + epoch).shuffle(idx)
            self._order, self._order_epoch = idx[self.rank::self.world_size], epoch
            if not self._order:
                raise ValueError(f"rank {self.rank} of {self.world_size} gets no record ({len(self.records)} records)")
        return self._order

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Position of the first record not yet in a micro-batch, counts, and the split."""
        epoch, cursor = (self._pending[0], self._pending[1]) if self._pending is not None else (self.epoch, self.cursor)
        return {"epoch": epoch, "cursor": cursor, "micro_batches": self.micro_batches,
                "skipped": dict(self.skipped), "bad": {str(i): r for i, r in sorted(self.bad.items())},
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("world_size", 1), state.get("rank", 0)) != (self.world_size, self.rank):
            raise ValueError(f"loader state is for rank {state.get('rank')} of {state.get('world_size')}, "
                             f"this is rank {self.rank} of {self.world_size}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.micro_batches = int(state.get("micro_batches", 0))
        self.skipped = Counter(state.get("skipped", {}))
        self.bad = {int(i): r for i, r in state.get("bad", {}).items()}
        self._pending = None

    # -- iteration -----------------------------------------------------------------------------------

    def _next_sample(self) -> Tuple[int, int, Sample]:
        """(epoch, cursor) of the next usable record and its sample; advances past bad records."""
        bad_in_a_row = 0
        while True:
            order = self._epoch_order(self.epoch)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            pos = (self.epoch, self.cursor)
            i = order[self.cursor]
            self.cursor += 1
            if i in self.bad:                   # met in an earlier epoch: skipped again, counted once
                bad_in_a_row += 1
                if bad_in_a_row > len(self.records):
                    raise RuntimeError(f"every record is bad (skipped: {dict(self.skipped)})")
                continue
            try:
                rec, rid, root = self.records.get(i)
                sample = self.processor.process(rec, rid, root)
                if self.max_length is not None:
                    sample = truncate_sample(sample, self.max_length, self.processor.ids,
                                             self.processor.image_spec.merge_size)
                if len(sample) > self.token_budget:
                    raise BadRecord(rid, f"is {len(sample)} tokens long, more than the token budget "
                                         f"({self.token_budget})", "too_long")
                return pos[0], pos[1], sample
            except RecursionError as exc:       # a structure deep enough to overflow the stack in processing
                err = BadRecord(self.records.items[i][1].name + f":{self.records.items[i][2]}",
                                "is nested too deeply to process", "malformed")
                err.__cause__ = exc
            except BadRecord as exc:
                err = exc
            refuse_bad(err, self.skip_bad)
            self.bad[i] = err.reason
            count_skipped(self.skipped, err)
            bad_in_a_row += 1
            if bad_in_a_row > len(self.records):
                raise RuntimeError(f"every record is bad (skipped: {dict(self.skipped)})") from err

    def __iter__(self) -> Iterator[List[Sample]]:
        while True:
            yield self.next_micro_batch()
