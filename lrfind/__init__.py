"""lrfind: find a learning rate with a range test, then train with one-cycle and friends."""

from . import schedules
from .callback import (
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    ParamScheduler,
    TorchScheduler,
)
from .checkpoint import Checkpoint, EarlyStopping, SaveBest
from .finder import LRFindResult, lr_find
from .learner import Learner
from .metrics import accuracy, error_rate
from .recorder import Recorder
from .suggest import SUGGESTIONS, auto, minimum, slide, steep, valley

__version__ = "0.1.0"

__all__ = [
    "Callback", "CancelBatchException", "CancelEpochException", "CancelFitException",
    "CancelStepException", "Checkpoint", "EarlyStopping", "LRFindResult", "Learner",
    "ParamScheduler", "Recorder", "SaveBest",
    "SUGGESTIONS", "TorchScheduler", "accuracy", "auto", "error_rate", "lr_find", "minimum",
    "schedules", "slide", "steep", "valley",
]
