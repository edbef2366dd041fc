"""Checkpoint files of the trainer: RNG state as plain data, tensor files read with ``weights_only=True``,
verification against ``MANIFEST.json``, the repair of an interrupted re-save and the choice of the checkpoint to
resume from (:func:`find_checkpoint`). :class:`moca.train.core.Trainer` writes and reads them."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..fsutil import fsync_dir, verify_manifest
from .safety import CheckpointError

log = logging.getLogger("moca.train")

# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------


INCOMPLETE_MARKER = "INCOMPLETE"    # in an export folder that is not (yet) a complete model
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "trainer_state.json")   # plus rank*.pt, MANIFEST.json


def _rng_state() -> dict:
    """RNG states as tensors and plain data only (loadable with ``torch.load(weights_only=True)``)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [int(py[0]), [int(x) for x in py[1]], py[2]],
          "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                    float(cached)],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = list(torch.cuda.get_rng_state_all())
    return st


def _set_rng_state(st: dict) -> None:
    version, keys, gauss = st["python"]
    random.setstate((int(version), tuple(int(x) for x in keys), gauss))
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, np.asarray(keys.numpy(), dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _fsync_dir(path: Path) -> None:
    fsync_dir(path)


def _save_torch(obj, path: Path) -> None:
    """torch.save through a Python file, so a full disk raises OSError naming the cause (the C++ writer says
    only "basic_ios::clear: iostream error")."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _load_torch(path: Path, map_location):
    """torch.load of tensors and plain data only: a checkpoint can hold no code (weights_only=True)."""
    with open(path, "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=True)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def verify_checkpoint(path: Path) -> Optional[str]:
    """None when the checkpoint folder is complete and every file has the size and SHA-256 checksum recorded
    in its ``MANIFEST.json`` when it was written; else what is wrong, naming the file."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a folder"
    if not (path / "COMPLETE").exists():
        return f"{path / 'COMPLETE'} is missing (the save did not finish)"
    mf = path / "MANIFEST.json"
    if not mf.exists():
        return f"{mf} is missing (written by an older moca: it cannot be verified or loaded safely)"
    try:
        files = json.loads(mf.read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{mf} is unreadable ({type(exc).__name__}: {exc})"
    need = list(CHECKPOINT_FILES) + ["rank00000.pt"]
    missing = [n for n in need if n not in files]
    if missing:
        return f"{mf} does not list {missing}"
    problem = verify_manifest(path, files)
    if problem:
        return problem
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["step"]), int(state["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path / 'trainer_state.json'} is unreadable ({type(exc).__name__}: {exc})"
    return None


def recover_checkpoints(root: Path) -> None:
    """Tidy ``root`` (``<output_dir>/checkpoints``) after a killed save: remove unfinished ``.tmp_step_*``
    folders and half-removed old checkpoints (``.del_step_*``); put back a ``.old_step_*`` folder (the previous copy, moved aside while a checkpoint of the same
    step was re-saved) whose replacement never arrived, and remove it when it did. Call with the run lock held."""
    if not root.is_dir():
        return
    for tmp in root.glob(".tmp_step_*"):
        log.warning("removing %s, an unfinished checkpoint left by an interrupted save", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    for gone in root.glob(".del_step_*"):      # an old checkpoint whose removal was interrupted
        shutil.rmtree(gone, ignore_errors=True)
    for old in root.glob(".old_step_*"):
        final = root / old.name[len(".old_"):]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            log.warning("restoring %s from %s (a re-save of that checkpoint was interrupted)", final, old)
            os.replace(old, final)
            fsync_dir(root)


def find_checkpoint(spec: Optional[str], output_dir: Path) -> Optional[Path]:
    """Resolve ``resume``: "auto" = the newest intact checkpoint under output_dir (None when there is none at
    all), a path = that checkpoint (which must be intact), None/"none" = start fresh.

    Each checkpoint is verified against its manifest; a damaged newest one is passed over with a warning
    naming the file and what is wrong. Raises :class:`CheckpointError` when checkpoints exist but none is
    intact (``resume: null`` starts afresh)."""
    if spec is None or spec is False or str(spec).lower() in ("none", "null", "false", ""):
        return None
    if str(spec).lower() != "auto":
        p = Path(spec)
        problem = verify_checkpoint(p)
        if problem:
            raise CheckpointError(f"resume: {p} is not an intact checkpoint: {problem}")
        return p
    root = output_dir / "checkpoints"
    found = sorted((p for p in root.glob("step_*") if p.is_dir()), key=_step_of) if root.exists() else []
    problems = []
    for p in reversed(found):
        problem = verify_checkpoint(p)
        if problem is None:
            for bad, why in problems:
                log.warning("checkpoint %s is damaged (%s); resuming from %s instead", bad, why, p)
            return p
        problems.append((p, problem))
    if problems:
        raise CheckpointError("no intact checkpoint in " + str(root) + ": " +
                              "; ".join(f"{p.name}: {why}" for p, why in problems) +
                              " (set train.resume: null to start afresh)")
    return None
