"""Training machinery shared by Stage 1 and Stage 2: distributed set-up, AdamW + warm-up/linear decay,
bf16 autocast, gradient accumulation and clipping, atomic checkpoint/resume, JSONL/TensorBoard logs, progress.

A stage builds a model and a source of micro-batches and hands them to :class:`Trainer`::

    trainer = Trainer(cfg.train, model, data=loader_like, next_micro_batch=fn, loss_fn=fn, dist=dist)
    trainer.fit()

``loss_fn(model, batch) -> dict`` returns a differentiable ``"loss"`` and any float metrics; a stage that
needs its own step (GradCache) overrides :meth:`Trainer.compute_step`. The data object only needs
``state_dict()`` / ``load_state_dict()`` and may expose ``skipped`` counts.

Checkpoints (``<output_dir>/checkpoints/step_XXXXXXXX``; their files in :mod:`moca.train.checkpoint`, the logs
in :mod:`moca.train.metrics`) hold the model (safetensors), the optimizer and
scheduler (``optimizer.pt``), the trainer state (JSON), each rank's data position and RNG states
(``rankNNNNN.pt``), and a ``MANIFEST.json`` with the size and SHA-256 of every file. The ``.pt`` files hold
tensors and plain data only and are read with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
A checkpoint is written into a temporary folder and renamed when complete, so a crash mid-save leaves the
previous one intact; resume verifies checkpoints against their manifests and takes the newest intact one;
resuming on CPU reproduces the losses of an uninterrupted run exactly. Run safety (the output-folder lock,
SIGTERM / SIGINT, the errors the command reports) is in :mod:`moca.train.safety`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..config import dump_config
from ..fsutil import build_manifest, fsync_dir
from .safety import CheckpointError, ExportError, GracefulStop, RunLock, TrainingInterrupted, fault
# the checkpoint helpers are looked up here at call time (tests patch core._save_torch); find_checkpoint and
# verify_checkpoint are part of this module's face
from .checkpoint import (CHECKPOINT_FILES, INCOMPLETE_MARKER, _fsync_dir, _load_torch, _rng_state,  # noqa: F401
                         _save_torch, _set_rng_state, _step_of, find_checkpoint, recover_checkpoints,
                         verify_checkpoint)
from .metrics import MetricsLogger

log = logging.getLogger("moca.train")


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and logging settings shared by both stages."""

    output_dir: str = "runs/moca"
    max_steps: int = 100
    stop_at_step: Optional[int] = None  # leave after this step with a checkpoint, as if interrupted (job time limits)
    grad_accum: int = 1
    lr: float = 2e-6
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 5.0
    seed: int = 0
    bf16: str = "auto"                 # auto (on GPU) | true | false
    gradient_checkpointing: bool = False
    log_every: int = 1
    save_every: int = 0                # 0 = only at the end
    keep_checkpoints: int = 2
    resume: Optional[str] = "auto"     # auto (latest in output_dir if any) | a checkpoint path | null
    parallel: str = "ddp"              # ddp | fsdp (FSDP2, for models that do not fit one GPU)
    find_unused_parameters: bool = True
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.max_steps < 1 or self.grad_accum < 1:
            raise ValueError(f"max_steps and grad_accum must be >= 1, got {self.max_steps}, {self.grad_accum}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if str(self.bf16).lower() not in ("auto", "true", "false"):
            raise ValueError(f"bf16 must be auto, true or false, got {self.bf16!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.log_every < 1 or self.save_every < 0:
            raise ValueError(f"log_every must be >= 1 and save_every >= 0 (0 = only at the end), got "
                             f"{self.log_every}, {self.save_every}")


# --------------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------------


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: List[float]) -> List[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return t.tolist()


def init_distributed(device: Optional[str] = None) -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group
    (nccl on GPU, gloo on CPU). A plain ``python`` run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world, local, dev)


# --------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases, norms and 1-D parameters get no weight decay."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.dim() < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             foreach=True)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step s: linear warm-up over warmup_ratio * max_steps, then
    linear decay to min_lr_ratio at max_steps."""
    warm = int(round(cfg.warmup_ratio * cfg.max_steps))
    total = cfg.max_steps

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(total - warm, 1)
        return max(cfg.min_lr_ratio, 1.0 - (1.0 - cfg.min_lr_ratio) * min(frac, 1.0))
    return f


def run_stage(cfg, dist: Optional["DistEnv"], body: Callable) -> List[dict]:
    """A stage's run around ``body(cfg, dist, out)``, the same for Stage 1 and Stage 2: the distributed set-up
    (``dist`` None: from the environment), the output folder's :class:`~moca.train.safety.RunLock` on rank 0
    (one run per folder; :meth:`Trainer.fit` holds it too), the seed, and ``config.yaml`` written first."""
    dist = dist or init_distributed()
    out = Path(cfg.train.output_dir)
    lock = RunLock(out).acquire() if dist.is_main else None
    try:
        torch.manual_seed(cfg.train.seed)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, out / "config.yaml")
        return body(cfg, dist, out)
    finally:
        if lock is not None:
            lock.release()


# --------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------


class Trainer:
    """Generic training loop (see the module docstring).

    Args:
        cfg: :class:`TrainConfig`.
        model: the module whose ``forward`` the loss function calls (unwrapped; the trainer wraps it in DDP
            or shards it with FSDP2 when running under torchrun).
        data: object with ``state_dict()`` / ``load_state_dict()`` (the loader; its position is checkpointed).
        next_micro_batch: ``fn(micro_index) -> batch`` on CPU (the trainer moves it to the device).
        loss_fn: ``fn(model, batch) -> dict`` with a differentiable ``"loss"`` and float metrics.
        dist: :class:`DistEnv`.
        tokens_of: ``fn(batch) -> int`` tokens counted for tokens/s (default ``batch.num_tokens``).
        save_extra: ``fn(final_dir, full_state)`` called on rank 0 to export the final model (e.g.
            save_pretrained); ``full_state`` is None, or under FSDP the gathered full state dict (CPU tensors) to
            load into an unsharded copy first.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, data, next_micro_batch: Callable, loss_fn: Callable,
                 dist: Optional[DistEnv] = None, tokens_of: Optional[Callable] = None,
                 save_extra: Optional[Callable] = None):
        self.cfg = cfg
        self.dist = dist or DistEnv()
        self.out = Path(cfg.output_dir)
        self.data, self.next_micro_batch, self.loss_fn = data, next_micro_batch, loss_fn
        self.tokens_of = tokens_of or (lambda b: int(getattr(b, "num_tokens", 0)))
        self.save_extra = save_extra
        dev = self.dist.device
        bf16 = str(cfg.bf16).lower()
        self.autocast_dtype = torch.bfloat16 if (bf16 == "true" or (bf16 == "auto" and dev.type == "cuda")) else None
        self.model = model.to(dev)
        self.module = self.model           # the unwrapped module (for saving)
        if cfg.gradient_checkpointing:
            self._enable_gradient_checkpointing(model)
        self.model = self._wrap(model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        self.micro_index = 0
        self.tokens_seen = 0
        self.history: List[dict] = []
        self._loaded_from: Optional[Path] = None
        self._loaded_step = -1
        self.logger = MetricsLogger(self.out / "logs", self.dist.is_main, cfg.tensorboard)

    # -- set-up --------------------------------------------------------------------------------------

    @staticmethod
    def _enable_gradient_checkpointing(model: nn.Module) -> None:
        for m in model.modules():
            if hasattr(m, "gradient_checkpointing_enable") and m is not model:
                m.gradient_checkpointing_enable()
                return
        raise ValueError("gradient_checkpointing: the model has no transformers sub-model to enable it on")

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.dist.distributed:
            return model
        if self.cfg.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard   # torch >= 2.6

            for m in model.modules():
                if type(m).__name__.endswith(("DecoderLayer", "VisionBlock")):
                    fully_shard(m)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=self.cfg.find_unused_parameters)

    # -- checkpoints ---------------------------------------------------------------------------------

    def _full_state(self):
        if self.cfg.parallel == "fsdp" and self.dist.distributed:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.model, options=opts), get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return None, self.optimizer.state_dict()

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_XXXXXXXX`` atomically; keep the newest ``keep_checkpoints``.

        Every file goes into ``.tmp_step_XXXXXXXX``, then ``MANIFEST.json`` (size and SHA-256 of each file) and
        ``COMPLETE``, then the folder is renamed into place. A checkpoint of the same step that is already
        there is moved aside first and removed only after the new one is in place (a kill in between leaves
        it to be restored on the next start). A write error (a full disk) removes the temporary folder and
        raises :class:`CheckpointError` naming the checkpoint and the cause."""
        from safetensors.torch import save_file, save_model

        root = self.out / "checkpoints"
        final = root / f"step_{self.step:08d}"
        tmp = root / f".tmp_step_{self.step:08d}"
        if self._loaded_from is not None and self._loaded_from.resolve() == final.resolve() \
                and self._loaded_step == self.step:
            return final        # resumed here and took no step: that checkpoint is this state
        try:
            if self.dist.is_main:
                root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            self.dist.barrier()
            r = self.dist.rank
            _save_torch({"rng": _rng_state(), "data": self.data.state_dict()}, tmp / f"rank{r:05d}.pt")
            fault("save.write", tmp / "model.safetensors")
            model_state, optim_state = self._full_state()
            if self.dist.is_main:
                if model_state is not None:
                    save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
                else:
                    save_model(self.module, str(tmp / "model.safetensors"))
                _save_torch({"optimizer": optim_state, "scheduler": self.scheduler.state_dict()}, tmp / "optimizer.pt")
                (tmp / "trainer_state.json").write_text(json.dumps({
                    "step": self.step, "micro_index": self.micro_index, "tokens_seen": self.tokens_seen,
                    "world_size": self.dist.world_size, "max_steps": self.cfg.max_steps}))
            self.dist.barrier()
            if self.dist.is_main:
                names = sorted(f.name for f in tmp.iterdir())
                for name in names:
                    with open(tmp / name, "rb") as fh:
                        os.fsync(fh.fileno())
                fault("save.manifest", tmp / "MANIFEST.json")
                (tmp / "MANIFEST.json").write_text(json.dumps({"files": build_manifest(tmp, names)}, indent=1))
                (tmp / "COMPLETE").write_text("ok\n")
                for name in ("MANIFEST.json", "COMPLETE"):
                    with open(tmp / name, "rb") as fh:
                        os.fsync(fh.fileno())
                _fsync_dir(tmp)
                self._install(tmp, final)
        except BaseException as exc:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, Exception):
                cause = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
                raise CheckpointError(f"could not write checkpoint {final}: {cause} (the unfinished {tmp} was "
                                      f"removed; earlier checkpoints are intact)") from exc
            raise
        if self.dist.is_main:
            done = sorted((p for p in root.glob("step_*") if (p / "COMPLETE").exists()), key=_step_of)
            for old in done[:-max(self.cfg.keep_checkpoints, 1)]:
                if old != final:       # renamed first: a kill in the rmtree leaves no half checkpoint named step_*
                    gone = root / f".del_{old.name}"
                    os.replace(old, gone)
                    fault("save.prune", gone)
                    shutil.rmtree(gone, ignore_errors=True)
        self.dist.barrier()
        return final

    @staticmethod
    def _install(tmp: Path, final: Path) -> None:
        """Rename the finished ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed only
        once the new one is in place."""
        root = final.parent
        aside = root / f".old_{final.name}"
        if final.exists():
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)
            fault("save.swap", final)
        os.replace(tmp, final)
        fsync_dir(root)
        if aside.exists():
            fault("save.cleanup", aside)
            shutil.rmtree(aside, ignore_errors=True)

    def _choose_checkpoint(self) -> Optional[Path]:
        """Rank 0 tidies the checkpoint folder and picks the newest intact checkpoint (``resume``); every rank
        gets rank 0's choice."""
        choice, error = None, None
        if self.dist.is_main:
            try:
                recover_checkpoints(self.out / "checkpoints")
                choice = find_checkpoint(self.cfg.resume, self.out)
            except Exception as exc:       # raised below on every rank, so none waits for the others
                error = exc
        if self.dist.distributed:
            box = [None if choice is None else str(choice), None if error is None else str(error)]
            torch.distributed.broadcast_object_list(box, src=0)
            if not self.dist.is_main:
                choice = None if box[0] is None else Path(box[0])
                error = CheckpointError(box[1]) if box[1] is not None else None
        if error is not None:
            raise error
        return choice

    def load_checkpoint(self, path: Path) -> None:
        """Load a checkpoint written by :meth:`save_checkpoint` (verify it first: :func:`verify_checkpoint`).
        Only tensors and plain data are read (``weights_only=True``); a file that holds anything else, or that
        does not fit this run, raises :class:`CheckpointError` naming it."""
        from safetensors.torch import load_file, load_model

        def named(name: str, fn):
            try:
                return fn()
            except Exception as exc:
                raise CheckpointError(f"checkpoint {path}: cannot load {name}: {type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc

        state = named("trainer_state.json", lambda: json.loads((path / "trainer_state.json").read_text()))
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes, this run has "
                             f"{self.dist.world_size}; the data split would differ")
        if self.cfg.parallel == "fsdp" and self.dist.distributed:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            named("model.safetensors", lambda: set_model_state_dict(
                self.model, load_file(str(path / "model.safetensors")), options=opts))
            opt = named("optimizer.pt", lambda: _load_torch(path / "optimizer.pt", "cpu"))
            named("optimizer.pt", lambda: set_optimizer_state_dict(self.model, self.optimizer, opt["optimizer"],
                                                                   options=opts))
        else:
            missing, unexpected = named("model.safetensors", lambda: load_model(
                self.module, str(path / "model.safetensors"), strict=False, device=str(self.dist.device)))
            if unexpected or [m for m in missing if not self._is_tied(m)]:
                raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            opt = named("optimizer.pt", lambda: _load_torch(path / "optimizer.pt", self.dist.device))
            named("optimizer.pt", lambda: self.optimizer.load_state_dict(opt["optimizer"]))
        named("optimizer.pt", lambda: self.scheduler.load_state_dict(opt["scheduler"]))
        rank_file = f"rank{self.dist.rank:05d}.pt"
        mine = named(rank_file, lambda: _load_torch(path / rank_file, "cpu"))
        named(rank_file, lambda: self.data.load_state_dict(mine["data"]))
        named(rank_file, lambda: _set_rng_state(mine["rng"]))
        self.step, self.micro_index = state["step"], state["micro_index"]
        self.tokens_seen = state.get("tokens_seen", 0)
        self._loaded_from, self._loaded_step = Path(path), self.step
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def _is_tied(self, name: str) -> bool:
        return name.endswith("lm_head.weight")

    # -- steps ---------------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    def compute_step(self) -> Dict[str, object]:
        """Forward/backward of one optimizer step over ``grad_accum`` micro-batches; returns averaged metrics
        (tensors are fine: they are read only when logged, so steps between logs never wait for the GPU) and
        ``tokens``. Stages with their own step (GradCache) override this."""
        sums: Dict[str, object] = {}
        tokens = 0
        n = self.cfg.grad_accum
        for i in range(n):
            batch = self.next_micro_batch(self.micro_index).to(self.dist.device, non_blocking=True)
            self.micro_index += 1
            tokens += self.tokens_of(batch)
            sync = nullcontext()
            if i < n - 1 and self.dist.distributed and hasattr(self.model, "no_sync"):
                sync = self.model.no_sync()
            with sync:
                with self._autocast():
                    out = self.loss_fn(self.model, batch)
                (out["loss"] / n).backward()
            for k, v in out.items():
                v = v.detach().float() if torch.is_tensor(v) else float(v)
                sums[k] = sums[k] + v if k in sums else v
        metrics = {k: (v / n if not k.endswith("_count") else v) for k, v in sums.items()}
        metrics["tokens"] = tokens
        return metrics

    def optimizer_step(self):
        """Clip, step, schedule, zero the gradients; returns the gradient norm before clipping (a tensor)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        else:
            norm = float("nan")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- the loop ------------------------------------------------------------------------------------

    def fit(self) -> List[dict]:
        """Train to ``max_steps`` (resuming first when asked); returns the logged metrics of this run.

        Holds the output folder's :class:`~moca.train.safety.RunLock` (rank 0). SIGTERM / SIGINT finish the
        current step, write a checkpoint and raise :class:`~moca.train.safety.TrainingInterrupted`; a second
        signal exits at once."""
        lock = RunLock(self.out).acquire() if self.dist.is_main else None
        try:
            with GracefulStop() as stop:
                return self._fit(stop)
        finally:
            if lock is not None:
                lock.release()

    def _stop_requested(self, stop: GracefulStop) -> bool:
        if not self.dist.distributed:
            return stop.requested
        return self.dist.all_reduce_sum([1.0 if stop.requested else 0.0])[0] > 0   # every rank stops together

    def _fit(self, stop: GracefulStop) -> List[dict]:
        ckpt = self._choose_checkpoint()
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        self.logger.start(self.step)
        if self.step >= self.cfg.max_steps:
            log.info("nothing to do: the run is already at step %d of %d", self.step, self.cfg.max_steps)
        bar = None
        if self.cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self.model.train()
        t_window, tok_window = time.perf_counter(), 0
        interrupted = False
        try:
            stop_at = min(self.cfg.max_steps, self.cfg.stop_at_step or self.cfg.max_steps)
            while self.step < stop_at:
                metrics = self.compute_step()
                grad_norm = self.optimizer_step()
                self.step += 1
                fault("step")
                interrupted = self._stop_requested(stop)
                tok = metrics.pop("tokens")
                tok_window += tok
                self.tokens_seen += tok
                if self.step % self.cfg.log_every == 0 or self.step == stop_at or interrupted:
                    keys = sorted(k for k in metrics)
                    grad_norm = float(grad_norm)
                    summed = self.dist.all_reduce_sum([float(metrics[k]) for k in keys] + [tok_window])
                    W = self.dist.world_size
                    rec = {k: (v if k.endswith("_count") else v / W) for k, v in zip(keys, summed[:-1])}
                    dt = time.perf_counter() - t_window
                    rec.update(lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm,
                               tokens_per_s=summed[-1] / max(dt, 1e-9), tokens_seen=self.tokens_seen * W)
                    skipped = getattr(self.data, "skipped", None)
                    if skipped is not None:
                        rec["skipped"] = sum(self.dist.all_reduce_sum([sum(dict(skipped).values())]))
                        rec["skipped_by_reason"] = dict(skipped)
                    self.history.append({"step": self.step, **rec})
                    self.logger.log(self.step, rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}",
                                        tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
                    t_window, tok_window = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                if interrupted:
                    break
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < stop_at:
                    self.save_checkpoint()
            path = self.save_checkpoint()
            if interrupted and self.step < self.cfg.max_steps:
                raise TrainingInterrupted(stop.signame, stop.signum, self.step, self.cfg.max_steps, path)
            if self.save_extra is not None and self.step >= self.cfg.max_steps:
                self.dist.barrier()
                full_state, _ = (self._full_state() if self.cfg.parallel == "fsdp" and self.dist.distributed
                                 else (None, None))        # FSDP: gathered on every rank, saved by rank 0
                if self.dist.is_main:
                    self._export(self.out / "final", full_state, path)
                self.dist.barrier()
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()
        return self.history

    def _export(self, final: Path, full_state, checkpoint: Path) -> None:
        """Run ``save_extra`` into ``final`` behind an ``INCOMPLETE`` marker, removed only when the export has
        finished: an export cut short (a full disk, a kill) stays marked, and moca's loaders refuse it."""
        final.mkdir(parents=True, exist_ok=True)
        marker = final / INCOMPLETE_MARKER
        marker.write_text("this export has not finished (or failed): it is not a complete model\n")
        fsync_dir(final)
        try:
            fault("export", final / "model.safetensors")
            self.save_extra(final, full_state)
        except Exception as exc:
            try:
                marker.write_text(f"this export failed and is not a complete model: {exc}\n")
            except OSError:
                pass                       # the marker from before the export is still there
            cause = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            raise ExportError(f"export of the final model to {final} failed: {cause}. {final} is incomplete and "
                              f"marked so ({marker}); checkpoint {checkpoint} is intact: free space and run the "
                              f"same command again to export") from exc
        for f in final.rglob("*"):
            if f.is_file() and f != marker:
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        marker.unlink()
        fsync_dir(final)
