"""Trainers: FCMI, DFC (+ DEC and AE + k-means baselines), with checkpoints and resume.

    >>> from fairkernels.train import make_trainer
    >>> trainer = make_trainer("fcmi", n_clusters=10, epochs=50).fit(X, groups, y)
    >>> trainer.labels_, trainer.history
"""
from fairkernels.train.base import NonFiniteLossError, Trainer
from fairkernels.train.config import METHODS, DFCConfig, FCMIConfig, TrainConfig, config_for
from fairkernels.train.dfc import DFCTrainer
from fairkernels.train.fcmi import FCMITrainer


def make_trainer(method: str, **overrides) -> Trainer:
    """The trainer of `method` ("fcmi", "dfc", "dec", "ae-km") configured by keyword overrides."""
    config = config_for(method, **overrides)
    return FCMITrainer(config) if method == "fcmi" else DFCTrainer(config)


__all__ = ["METHODS", "DFCConfig", "DFCTrainer", "FCMIConfig", "FCMITrainer", "NonFiniteLossError", "TrainConfig",
           "Trainer", "config_for", "make_trainer"]
