"""Trainers: the shared core (optimizer, schedule, checkpoints, logs, DDP) and the stages built on it."""

from .core import DistEnv, TrainConfig, Trainer, init_distributed

__all__ = ["DistEnv", "TrainConfig", "Trainer", "init_distributed"]
