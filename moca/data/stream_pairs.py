"""Streaming Stage 2 pair records: task-homogeneous global batches without holding any subset in memory.

:class:`StreamPairLoader` is the streaming counterpart of :class:`~moca.data.retrieval.PairLoader` (selected with
``data.stream: true`` in Stage 2's config). Each subset is a :class:`~moca.data.stream.Source` (its ``files``:
JSONL / parquet files, folders or globs), read by ``world_size`` readers (reader = rank) exactly as Stage 1 reads
its sources: per epoch the subset's chunks are permuted and rank r reads chunks ``r::world_size``.

* The subset of step ``s`` is the same draw as :class:`~moca.data.sampler.TaskBatchSampler`'s
  (``random.Random(f"{seed}/step/{s}")`` weighted by the subsets' weights), a pure function of the seed and the
  step, so every rank takes the same subset: a global batch never mixes subsets, with no communication.
* Rank r contributes the next ``global_batch_size / world_size`` usable records of its reader of that subset.
  Within a pass over a subset no record goes to two ranks, and none comes twice (a rank's reader must hold at
  least a local batch of records per pass).
* Bad records (not JSON, missing side, missing / unreadable image, empty text, too few negatives) raise naming
  ``subset/shard:row``, or with ``skip_bad`` are skipped (counted on the subset's first pass, so once each). Unlike
  the in-memory loader, records are checked when they are read, not all up front.
* The state (step, each subset reader's position, skip counts) is plain JSON data; a resumed run draws the same
  batches. A state from another world size is refused.
* As the in-memory loader: ``format: pairs`` subsets (MoCa-CL-Pairs / mmE5 rows,
  :func:`~moca.data.published.pair_record`), image paths confined to the subset's ``image_root`` (default: each
  shard's folder) unless ``allow_outside_paths``, the ``max_image_pixels`` bound, ``pad_negatives`` and
  ``max_length``. Not available: a subset's ``max_records`` (the in-memory loader keeps the *first* n records; a
  stream has no cheap "first n" over a split set of shards), refused naming the subset.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import List, Optional, Sequence, Tuple

from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageError
from .processor import BadRecord, MocaProcessor
from .retrieval import SIDE_KEYS, PairBatch, SubsetConfig, _warn_skip, build_sample
from .stream import ReaderStream, Source, SourceConfig

log = logging.getLogger("moca.data")


class StreamPairLoader:
    """Stage 2 micro-batches streamed from the subsets' shards (see the module docstring).

    Args: as :class:`~moca.data.retrieval.PairLoader`; ``chunk_bytes``: largest JSONL byte range read at once.
    """

    def __init__(self, subsets: Sequence[SubsetConfig], processor: MocaProcessor, global_batch_size: int,
                 hard_negatives: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 skip_bad: bool = False, add_eos: bool = True, chunk_bytes: int = 4 << 20,
                 allow_outside_paths: bool = False, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 pad_negatives: bool = True, max_length: Optional[int] = None):
        if not subsets:
            raise ValueError("StreamPairLoader: no subsets")
        capped = [s.name for s in subsets if s.max_records is not None]
        if capped:
            raise ValueError(f"data.stream: true cannot take data.subsets[].max_records (set for {', '.join(capped)}): "
                             "the streaming loader has no 'first n records' of a subset; drop max_records or set "
                             "data.stream: false")
        names = [s.name for s in subsets]
        if len(set(names)) != len(names):
            raise ValueError(f"StreamPairLoader: subset names must be unique, got {names}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"StreamPairLoader: bad rank {rank} of world size {world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"StreamPairLoader: global_batch_size ({global_batch_size}) must be a positive multiple "
                             f"of the number of processes ({world_size})")
        self.configs, self.names = list(subsets), names
        self.processor, self.k, self.add_eos, self.skip_bad = processor, hard_negatives, add_eos, skip_bad
        self.pad_negatives, self.max_length = pad_negatives, max_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch_size, self.local_batch_size = global_batch_size, global_batch_size // world_size
        total = sum(s.weight for s in subsets)
        self.probs = [s.weight / total for s in subsets]
        sources = [Source(SourceConfig(name=s.name, path=list(s.files), format="moca"), world_size, chunk_bytes,
                          s.image_root, allow_outside_paths, max_image_pixels) for s in subsets]
        self.readers = [ReaderStream([src], rank, world_size, seed, shuffle) for src in sources]
        self.step = 0
        self.skipped: Counter = Counter()

    def subset_of_step(self, step: int) -> int:
        """The subset of ``step``: the same draw as ``TaskBatchSampler.subset_of_step``."""
        rng = random.Random(f"{self.seed}/step/{step}")
        return rng.choices(range(len(self.configs)), weights=self.probs)[0]

    # -- state ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"kind": "stream_pairs", "step": self.step, "readers": [r.state_dict() for r in self.readers],
                "skipped": dict(self.skipped), "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "subsets": list(self.names), "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "stream_pairs":
            raise ValueError("data state was saved by the in-memory Stage 2 loader; it cannot resume a streaming run "
                             "(data.stream must match the run that saved it)")
        for key in ("world_size", "rank", "subsets", "global_batch_size", "seed"):
            mine = getattr(self, "names" if key == "subsets" else key)
            if state.get(key) != mine:
                raise ValueError(f"data state was saved with {key}={state.get(key)!r}, this run has {mine!r}: a "
                                 f"streaming run resumes only with the same world size, subsets, batch and seed")
        for r, st in zip(self.readers, state["readers"]):
            r.load_state_dict(st)
        self.step = int(state["step"])
        self.skipped = Counter(state.get("skipped", {}))

    # -- batches -------------------------------------------------------------------------------------

    def _samples(self, rec, rid: str, root, cfg: SubsetConfig):
        if not isinstance(rec, dict):
            raise BadRecord(rid, f"expected a JSON object, got {type(rec).__name__}", "malformed")
        if cfg.format == "pairs":
            from .published import pair_record

            try:
                rec = pair_record(rec, root, rid)
            except ValueError as exc:
                reason = exc.reason if isinstance(exc, ImageError) else "malformed"
                raise BadRecord(rid, str(exc).removeprefix(f"{rid}: ").removeprefix(f"{rid} "), reason) from exc
        for key in SIDE_KEYS:
            if key not in rec:
                raise BadRecord(rid, f"has no '{key}'", "malformed")
        ins = rec.get("instruction", cfg.query_instruction)
        if ins is not None and not isinstance(ins, str):
            raise BadRecord(rid, f"'instruction' must be a string, got {type(ins).__name__}", "malformed")
        negs = rec.get("negatives", []) or []
        if not isinstance(negs, list):
            raise BadRecord(rid, "'negatives' must be a list of sides", "malformed")
        if self.pad_negatives and 0 < len(negs) < self.k:       # the official rule: repeat the last
            negs = negs + [negs[-1]] * (self.k - len(negs))
        if len(negs) < self.k:
            raise BadRecord(rid, f"has {len(negs)} hard negatives, the run uses {self.k} per query" +
                            ("" if self.pad_negatives else " (data.pad_negatives: true repeats the last one)"),
                            "few_negatives")
        n = self.max_length
        q = build_sample(self.processor, rec["query"], f"{rid} query", root, ins, self.add_eos, n)
        docs = [build_sample(self.processor, rec["positive"], f"{rid} positive", root, cfg.doc_instruction,
                             self.add_eos, n)]
        docs += [build_sample(self.processor, x, f"{rid} negatives[{i}]", root, cfg.doc_instruction, self.add_eos, n)
                 for i, x in enumerate(negs[:self.k])]
        return q, docs

    def _next_pair(self, s: int) -> Tuple[object, List, str]:
        reader, cfg = self.readers[s], self.configs[s]
        for _ in range(10000):
            raw, loc, si = reader.next()
            rid = None
            try:
                rec, rid, root = reader.record(raw, loc, si)
                q, docs = self._samples(rec, rid, root, cfg)
                return q, docs, rid
            except BadRecord as exc:
                # rename with the exact id (JSONL line number), keeping a side's suffix (" query", ...)
                cheap = rid if rid is not None else exc.record_id
                exact = reader.name(raw, loc, si)
                name = exc.record_id.replace(cheap, exact) if cheap in exc.record_id else exact
                msg = str(exc).split(": ", 1)[-1]
                if not self.skip_bad:
                    raise BadRecord(name, msg + " (set data.skip_bad: true to count and skip such records)",
                                    exc.reason) from exc
                if reader.pos[0][0] == 0:             # first pass over the subset: count once
                    self.skipped[exc.reason] += 1
                    _warn_skip(f"subset {cfg.name}: skipping record {name}: {msg}", sum(self.skipped.values()))
        raise RuntimeError(f"subset {cfg.name}: 10000 bad records in a row (skipped: {dict(self.skipped)})")

    def next_micro_batch(self) -> PairBatch:
        s = self.subset_of_step(self.step)
        queries, positives, negatives, ids = [], [], [], []
        for _ in range(self.local_batch_size):
            q, docs, rid = self._next_pair(s)
            queries.append(q)
            positives.append(docs[0])
            negatives += docs[1:]
            ids.append(rid)
        self.step += 1
        return PairBatch(queries, positives + negatives, self.configs[s].name, self.k, ids)
