"""Full MNIST (60,000 / 10,000, torchvision; download it first with
``python -m deqlite.data download mnist``), same model as the ``mnist`` preset."""
from .mnist import CONFIG as _MNIST

CONFIG = dict(_MNIST, dataset="mnist", epochs=5, pretrain_steps=500)
