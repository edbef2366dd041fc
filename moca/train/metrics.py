"""The trainer's logs: JSONL lines (always) and TensorBoard scalars (when installed), on rank 0."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict


log = logging.getLogger("moca.train")

# --------------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------------


class MetricsLogger:
    """JSONL lines (always) and TensorBoard scalars (when ``tensorboard`` is installed) on rank 0."""

    _warned = False

    def __init__(self, log_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(log_dir / "train.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(log_dir / "tensorboard"))
            except Exception as exc:  # tensorboard missing: JSONL only, said once
                if not MetricsLogger._warned:
                    log.warning("TensorBoard logging is off (%s: %s); metrics go to %s only",
                                type(exc).__name__, exc, log_dir / "train.jsonl")
                    MetricsLogger._warned = True

    def start(self, step: int) -> None:
        """Begin a run at optimizer step ``step`` (0 = a fresh run, else the step resumed from): drop the lines an
        earlier run in the same folder wrote for later steps, so the file holds one line per step of this run's
        history (a fresh run in an old folder starts empty; a resumed one keeps what its checkpoint covers)."""
        if not self.enabled:
            return
        path = Path(self.file.name)
        self.file.close()
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):   # a line cut short by a crash
                continue
        path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: Dict[str, object]) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()
        except OSError as exc:     # a full disk: name the file
            raise OSError(exc.errno, exc.strerror or str(exc), self.file.name) from exc
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
