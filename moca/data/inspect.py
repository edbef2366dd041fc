"""``moca data inspect FILE_OR_FOLDER``: how a file or folder will be read (format detected, the first records as
parsed, counts, problems found), before a long run finds out.

Formats detected: ``beir`` (a folder with corpus/ queries/ qrels/), ``mmeb`` (parquet with qry_text,
qry_img_path, tgt_text, tgt_img_path), ``pairs`` (MoCa-CL-Pairs / mmE5 / MMEB-train: qry, qry_image_path,
pos_text, pos_image_path, ...), ``moca_pretrain`` (text + images bytes), and our own JSONL: ``moca`` Stage 1
records (``content``), ``moca_pairs`` (query / positive / negatives), ``candidates`` and ``retrieval`` eval
files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import List, Optional, Tuple

from .published import (EncodedImage, pair_record, parquet_files, pretrain_record, read_beir, read_mmeb_task,
                         read_parquet_rows)

MAX_PROBLEMS = 10


def _detect_columns(cols) -> str:
    cols = set(cols)
    if {"qry_text", "qry_img_path", "tgt_text", "tgt_img_path"} <= cols:
        return "mmeb"
    if {"qry", "qry_image_path", "pos_text", "pos_image_path"} <= cols:
        return "pairs"
    if "text" in cols and "images" in cols:
        return "moca_pretrain"
    if "content" in cols:
        return "moca"
    if {"query", "positive"} <= cols:
        return "moca_pairs"
    if {"query", "candidates", "answer"} <= cols:
        return "candidates"
    if {"query", "relevant"} <= cols:
        return "retrieval"
    if {"id", "doc"} <= cols:
        return "retrieval_corpus"
    return "unknown"


def _rows(path: Path, limit: Optional[int] = None) -> Tuple[List[Tuple[dict, str]], int]:
    """The first ``limit`` records (parsed) and the total count (parquet: from the file metadata, nothing else
    read; JSONL: lines counted)."""
    if path.is_dir() or path.suffix == ".parquet":
        import pyarrow.parquet as pq

        out, total = [], 0
        for f in parquet_files(path, str(path)):
            pf = pq.ParquetFile(f)
            total += pf.metadata.num_rows
            n = 0
            for batch in pf.iter_batches(batch_size=256):
                if limit is not None and len(out) >= limit:
                    break
                for row in batch.to_pylist():
                    n += 1
                    if limit is None or len(out) < limit:
                        out.append((row, f"{f.name}:{n}"))
        return out, total
    out, total = [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            total += 1
            if limit is not None and len(out) >= limit:
                continue
            try:
                out.append((json.loads(line), f"{path.name}:{n}"))
            except json.JSONDecodeError as exc:
                out.append(({"__error__": f"not valid JSON ({exc.msg})"}, f"{path.name}:{n}"))
    return out, total


def _short(obj, n: int = 300) -> str:
    s = json.dumps(obj, default=lambda o: repr(o) if isinstance(o, EncodedImage) else f"<{type(o).__name__}>",
                   ensure_ascii=False)
    return s if len(s) <= n else s[:n] + " ..."


def inspect(path, n_show: int = 3, image_root: Optional[str] = None, max_records: Optional[int] = 1000) -> dict:
    """Detect the format and parse the first ``max_records`` records (None = all); returns {format, records
    (the total), checked, shown, problems, counts}."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and any((path / n).exists() or (path / f"{n}.parquet").exists() for n in ("corpus", "qrels")):
        bt = read_beir(path)
        shown = [{"query-id": q, "query": t, "relevant": bt.qrels[q]} for q, t in
                 zip(bt.query_ids[:n_show], bt.queries[:n_show])]
        return {"format": "beir", "records": len(bt.query_ids), "checked": len(bt.query_ids), "shown": shown,
                "problems": [],
                "counts": {"queries (judged)": len(bt.query_ids), "documents": len(bt.doc_ids),
                           "queries without judgments (left out)": bt.dropped_unjudged,
                           "judgments": sum(len(r) for r in bt.qrels.values()), "languages": bt.languages}}
    rows, total = _rows(path, max_records)
    if not rows:
        return {"format": "empty", "records": 0, "checked": 0, "shown": [], "problems": [f"{path}: no records"],
                "counts": {}}
    fmt = _detect_columns(rows[0][0].keys())
    problems, shown, counts = [], [], Counter()
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    if fmt == "mmeb":
        try:
            recs = read_mmeb_task(path, root, limit=max_records)
            shown = [{"id": r.id, "query": r.query, "candidates": r.candidates[:4], "gold": r.gold} for r in recs[:n_show]]
            counts["candidates per query"] = sorted({len(r.candidates) for r in recs})
            for r in recs:
                for side in [r.query] + r.candidates:
                    for p in _image_paths(side):
                        counts["images"] += 1
                        if not Path(p).is_file():
                            counts["missing images"] += 1
                            if len(problems) < MAX_PROBLEMS:
                                problems.append(f"{r.id}: image {p} does not exist")
        except (ValueError, FileNotFoundError) as exc:
            problems.append(str(exc))
    else:
        for rec, where in rows:
            if "__error__" in rec:
                problems.append(f"{where}: {rec['__error__']}")
                continue
            try:
                if fmt == "pairs":
                    parsed = pair_record(rec, root, where)
                    counts["negatives"] += len(parsed["negatives"])
                elif fmt == "moca_pretrain":
                    parsed = pretrain_record(rec, where)
                    counts["images"] += sum("image" in s for s in parsed["content"])
                else:
                    parsed = rec
                if len(shown) < n_show:
                    shown.append(parsed)
                if fmt == "pairs":
                    for side in [parsed["query"], parsed["positive"]] + parsed["negatives"]:
                        for p in _image_paths(side):
                            counts["images"] += 1
                            if not Path(p).is_file():
                                counts["missing images"] += 1
                                if len(problems) < MAX_PROBLEMS:
                                    problems.append(f"{where}: image {p} does not exist")
            except ValueError as exc:
                counts["unparsable"] += 1
                if len(problems) < MAX_PROBLEMS:
                    problems.append(str(exc))
    return {"format": fmt, "records": total, "checked": len(rows), "shown": shown, "problems": problems, "counts": dict(counts),
            "files": [str(f) for f in (parquet_files(path) if path.is_dir() else [path])]}


def _image_paths(side) -> List[str]:
    if isinstance(side, dict) and "content" in side:
        return [s["image"] for s in side["content"] if "image" in s and isinstance(s["image"], str)]
    if isinstance(side, dict) and isinstance(side.get("image"), str):
        return [side["image"]]
    return []


def _command(args) -> int:
    try:
        rep = inspect(args.path, n_show=args.show, image_root=args.image_root,
                      max_records=None if args.check == 0 else args.check)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"{args.path}: format {rep['format']}, {rep['records']} records"
          + (f" ({rep['checked']} checked)" if rep["checked"] < rep["records"] else ""))
    for k, v in rep["counts"].items():
        print(f"  {k}: {v}")
    for i, r in enumerate(rep["shown"]):
        print(f"record {i}: {_short(r)}")
    if rep["problems"]:
        print(f"problems ({len(rep['problems'])} shown):")
        for p in rep["problems"]:
            print(f"  {p}")
    else:
        print("problems: none found")
    return 1 if rep["problems"] else 0


def add_inspect(data_sub) -> None:
    p = data_sub.add_parser("inspect", help="show how a data file or folder will be read (format, first records, "
                                            "counts, problems)")
    p.add_argument("path", help="a JSONL / parquet file, a parquet folder (MMEB task) or a BEIR folder")
    p.add_argument("--show", type=int, default=3, help="records to print (default 3)")
    p.add_argument("--check", type=int, default=1000, help="records to parse and check (default 1000; 0 = all); "
                                                          "the total is counted without reading the rest")
    p.add_argument("--image-root", default=None, help="folder that image paths are relative to (default: the "
                                                      "file's folder)")
    p.set_defaults(func=_command)
