"""The training engine: `train` (the loop, checkpoints, resume, signals, logs), `evaluate` (PCKh), `predict`
(keypoints on images) and their pictures. The command line only parses arguments and calls these."""

from .config import PRESETS, TrainConfig, from_preset
from .evaluate import evaluate, pckh_on
from .predict import predict
from .train import TrainingError, train

__all__ = ["PRESETS", "TrainConfig", "from_preset", "train", "TrainingError", "evaluate", "pckh_on", "predict"]
