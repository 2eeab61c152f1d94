"""Training DEQs: one loop for images and text, with live dashboards, exact resume and DDP.

    from deqlite.train import Trainer, load_preset
    config = load_preset("mnist")                 # a dict of TrainConfig fields
    trainer = Trainer(config)
    trainer.fit(callback=TrainingDashboard().log) # deqlite.train.dashboard

The parts: ``config`` (``TrainConfig``), ``tasks`` (what the loop needs to know about the data),
``deq_hooks`` (what it does because the model is a DEQ), ``trainer`` (the loop, checkpoints,
resume), ``log`` (the JSONL run log), ``distributed`` (torchrun), ``dashboard`` (live figures of
runs), ``configs/`` (the presets) and ``__main__`` (``python -m deqlite.train``).
"""
from .config import TrainConfig
from .configs import PRESETS, load_preset
from .log import read_log
from .trainer import Trainer

__all__ = ["PRESETS", "TrainConfig", "Trainer", "load_preset", "read_log"]
