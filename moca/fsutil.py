"""Safe files: atomic writes (a temporary next to the target, fsync, rename), manifests of files (size and
SHA-256 of each) and their verification, and indexes of written data that are reused only when every file
they list is intact.

A reader never sees a half-written file under its final name: a write killed midway leaves at most a hidden
temporary (``.<name>.tmp.<pid>``), which the next write of the same file replaces. A folder of files written
together is committed by its index or manifest, written last (atomically) and checked before reuse.

No torch import here (the ``moca`` command imports this module early).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Union

log = logging.getLogger("moca")

PathLike = Union[str, os.PathLike]


def fsync_dir(path: PathLike) -> None:
    """Flush a folder's entries (renames into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", encoding: Optional[str] = None) -> Iterator:
    """Open a temporary next to ``path`` for writing; on a clean exit flush, fsync and rename it to ``path``,
    on any error (or a kill) ``path`` keeps its earlier content, or stays absent, and the temporary is
    removed (a kill leaves it; the next write of ``path`` replaces it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp.{os.getpid()}"
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None:   # a full disk: say which file
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_open`); returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_image(image, path: PathLike, **save_kwargs) -> Path:
    """Save a PIL image atomically as PNG (``save_kwargs`` go to ``Image.save``)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", **save_kwargs)
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------------


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _manifest_name(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` (posix separators) when inside it, else its absolute path."""
    try:
        return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix() if _inside(path, root) else \
            str(path.resolve())
    except ValueError:   # another drive (Windows)
        return str(path.resolve())


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def build_manifest(root: PathLike, files: Iterable[PathLike]) -> Dict[str, dict]:
    """``{name: {"size": bytes, "sha256": hex}}`` for each file (a name relative to ``root``, or absolute;
    relative paths in ``files`` are taken relative to ``root``)."""
    root = Path(root)
    out: Dict[str, dict] = {}
    for f in files:
        p = Path(f)
        p = p if p.is_absolute() else root / p
        out[_manifest_name(root, p)] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return dict(sorted(out.items()))


def verify_manifest(root: PathLike, manifest: Dict[str, dict]) -> Optional[str]:
    """None when every file of ``manifest`` (as written by :func:`build_manifest`) has its recorded size and
    checksum, else what is wrong with the first that does not (naming the file)."""
    root = Path(root)
    if not isinstance(manifest, dict):
        return "the manifest is not a mapping of files"
    for name, entry in manifest.items():
        p = Path(name) if Path(name).is_absolute() else root / name
        try:
            size, digest = int(entry["size"]), str(entry["sha256"])
        except (TypeError, KeyError, ValueError):
            return f"{name}: malformed manifest entry {entry!r}"
        try:
            actual = p.stat().st_size
        except FileNotFoundError:
            return f"{p} is missing"
        except OSError as exc:
            return f"{p} cannot be read ({exc})"
        if actual != size:
            return f"{p} has {actual} bytes, {size} were written ({'truncated' if actual < size else 'grown'})"
        try:
            if sha256_file(p) != digest:
                return f"{p} is damaged (its SHA-256 checksum differs from the one written with it)"
        except OSError as exc:
            return f"{p} cannot be read ({exc})"
    return None


# --------------------------------------------------------------------------------------------------------
# Indexes of written data
# --------------------------------------------------------------------------------------------------------


def files_named_by_jsonl(paths: Iterable[PathLike]) -> List[Path]:
    """Each JSONL file and every image file its records name (``{"image": "rel/or/abs.png"}`` anywhere in a
    record; relative paths resolve against the JSONL's folder), in first-seen order, without repeats."""
    out: Dict[str, Path] = {}

    def walk(obj, base: Path) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k in ("image", "images") and isinstance(v, str):
                    p = Path(v) if Path(v).is_absolute() else base / v
                    out.setdefault(str(p), p)
                else:
                    walk(v, base)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, base)

    for f in paths:
        f = Path(f)
        out.setdefault(str(f), f)
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    walk(json.loads(line), f.parent)
    return list(out.values())


def save_index(index: PathLike, data: dict, files: Iterable[PathLike]) -> dict:
    """Write ``data`` plus a ``"files"`` manifest of ``files`` to ``index`` (JSON, atomically, last: it
    commits the data); returns what was written."""
    index = Path(index)
    data = dict(data, files=build_manifest(index.parent, files))
    atomic_write_text(index, json.dumps(data, indent=2))
    return data


def load_index(index: PathLike, matches: Callable[[dict], bool]) -> Optional[dict]:
    """The data of an index written by :func:`save_index` when it is readable, ``matches(data)`` (same
    settings) and every file it lists is intact; else None, with a warning naming what was wrong (none when
    the index is absent or was written for other settings: the caller writes the data again)."""
    index = Path(index)
    if not index.exists():
        return None
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); writing the data again", index, exc)
        return None
    if not isinstance(data, dict) or not matches(data):
        return None
    if not isinstance(data.get("files"), dict):
        log.warning("%s lists no files to verify (written by an older moca); writing the data again", index)
        return None
    problem = verify_manifest(index.parent, data["files"])
    if problem:
        log.warning("embedded data of %s: %s; writing the data again", index, problem)
        return None
    return data
