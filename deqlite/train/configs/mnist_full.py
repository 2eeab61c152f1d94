"""Full MNIST (60,000 / 10,000, torchvision; download it first with
``python -m deqlite.data download mnist``), same model as the ``mnist`` preset.

Follows no published run: the ``mnist`` recipe on 15× the data. Aims for at least the ``mnist``
preset's accuracy (not measured here: this machine cannot download MNIST)."""
from .mnist import CONFIG as _MNIST

CONFIG = dict(_MNIST, dataset="mnist", epochs=5, pretrain_steps=500)
