"""Training DEQs: one loop for images and text, with live dashboards, exact resume and DDP.

    from deqlite.train import Trainer, load_preset
    config = load_preset("mnist")                 # a dict of TrainConfig fields
    trainer = Trainer(config)
    trainer.fit(callback=TrainingDashboard().log) # deqlite.train.dashboard

The parts: ``config`` (``TrainConfig``), ``tasks`` (what the loop needs to know about the data),
``deq_hooks`` (what it does because the model is a DEQ), ``trainer`` (the loop, resume),
``checkpoint`` (checkpoint files that say what is wrong with them), ``log`` (the JSONL run log),
``tensorboard_log`` (its numbers as TensorBoard events),
``distributed`` (torchrun), ``dashboard`` (live figures of runs), ``adversarial`` (adversarial
examples by JIIO or PGD-k and adversarial training), ``configs/`` (the presets) and ``__main__``
(``python -m deqlite.train``).
"""
from .checkpoint import CheckpointError, load_checkpoint
from .config import TrainConfig
from .configs import PRESETS, load_preset
from .log import read_log
from .trainer import Trainer, TrainingDiverged

__all__ = ["PRESETS", "CheckpointError", "TrainConfig", "Trainer", "TrainingDiverged",
           "load_checkpoint", "load_preset", "read_log"]
