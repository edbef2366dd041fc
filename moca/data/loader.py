"""Record files and the packing loader: a resumable stream of micro-batches under a token budget.

:class:`RecordSet` reads local JSONL (one JSON object per line) or parquet files (needs ``pyarrow``; a
``content`` column holding the segment list, or a JSON string of it). :class:`PackingLoader` walks the records
in a seeded order (a new permutation per epoch, records split across ranks), processes them into samples and
groups consecutive samples into micro-batches of at most ``token_budget`` tokens. Its position (epoch,
cursor, skip counts) is a small dict: a resumed run continues with exactly the micro-batches an uninterrupted
run would have seen.

Bad records (missing or corrupt image, no text, longer than the budget, malformed) raise an error naming the
record and its file line, or, with ``skip_bad=True``, are counted by reason and skipped (a warning for each
of the first few, the totals in the loader's ``skipped`` dict and the training logs).
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
from .processor import BadRecord, MocaProcessor, truncate_sample

log = logging.getLogger("moca.data")


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
        row = dict(rows[n - self.starts[g]])
        if isinstance(row.get("content"), str):
            row["content"] = json.loads(row["content"])
        return row


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
            converted by :func:`moca.data.published.pretrain_record`).
    """

    def __init__(self, paths: Union[str, Path, Sequence[Union[str, Path]]], format: str = "moca"):
        if format not in ("moca", "moca_pretrain"):
            raise ValueError(f"data format must be 'moca' or 'moca_pretrain', got {format!r}")
        self.format = format
        if isinstance(paths, (str, Path)):
            paths = [paths]
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
                with open(p, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            self.items.append((line, p, n))
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
        """Append another set's records (same format). In place."""
        if other.format != self.format:
            raise ValueError(f"cannot merge record sets of formats {self.format!r} and {other.format!r}")
        self.items += other.items
        return self

    def get(self, i: int) -> Tuple[dict, str, Path]:
        """(record dict, record id, folder for relative image paths). Raises BadRecord for unparsable lines."""
        raw, path, n = self.items[i]
        where = f"{path.name}:{n}"
        if isinstance(raw, _LazyRow):
            try:
                raw = raw.src.row(raw.n)
            except json.JSONDecodeError as exc:
                raise BadRecord(where, f"'content' is not valid JSON ({exc.msg})", "malformed") from exc
        if isinstance(raw, str):
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise BadRecord(where, f"is not valid JSON ({exc.msg})", "malformed") from exc
        else:
            rec = raw
        if self.format == "moca_pretrain" and isinstance(rec, dict):
            from .published import pretrain_record

            try:
                rec = pretrain_record(rec, where)
            except ValueError as exc:
                raise BadRecord(where, str(exc).removeprefix(f"{where}: ").removeprefix(f"{where} "),
                                "malformed") from exc
        rid = f"{rec.get('id')} ({where})" if isinstance(rec, dict) and rec.get("id") is not None else where
        return rec, rid, path.parent


class PackingLoader:
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
        self.skipped: Counter = Counter()
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
                "skipped": dict(self.skipped), "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("world_size", 1), state.get("rank", 0)) != (self.world_size, self.rank):
            raise ValueError(f"loader state is for rank {state.get('rank')} of {state.get('world_size')}, "
                             f"this is rank {self.rank} of {self.world_size}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.micro_batches = int(state.get("micro_batches", 0))
        self.skipped = Counter(state.get("skipped", {}))
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
            except BadRecord as exc:
                if not self.skip_bad:
                    raise BadRecord(exc.record_id, str(exc).split(": ", 1)[-1] +
                                    " (set data.skip_bad: true to count and skip such records)", exc.reason) from exc
                self.skipped[exc.reason] += 1
                if sum(self.skipped.values()) <= 5:
                    log.warning("skipping %s", exc)
                bad_in_a_row += 1
                if bad_in_a_row > len(self.records):
                    raise RuntimeError(f"every record is bad (skipped: {dict(self.skipped)})") from exc

    def next_micro_batch(self) -> List[Sample]:
        """The next micro-batch: consecutive samples whose lengths sum to at most the token budget.

        The sample that did not fit is kept for the next call; the saved position points at it.
        """
        batch: List[Sample] = []
        used = 0
        while True:
            if self._pending is None:
                self._pending = self._next_sample()
            ep, cur, sample = self._pending
            full = self.max_samples is not None and len(batch) >= self.max_samples
            if batch and (used + len(sample) > self.token_budget or full):
                break
            batch.append(sample)
            used += len(sample)
            self._pending = None
        self.micro_batches += 1
        return batch

    def __iter__(self) -> Iterator[List[Sample]]:
        while True:
            yield self.next_micro_batch()
