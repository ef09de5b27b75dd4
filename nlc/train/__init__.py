"""Training: the outer loop (`loop`), data sources (`data`), checkpoints, metrics, plots, multi-process runs."""

from nlc.train.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from nlc.train.loop import Diverged, Options, Result, TrainError, train

__all__ = ["CheckpointError", "Diverged", "Options", "Result", "TrainError", "load_model", "read_checkpoint", "save_checkpoint", "train"]
