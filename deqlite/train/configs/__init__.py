"""Named training presets: each module here defines ``CONFIG``, a dict of ``TrainConfig`` fields.

    python -m deqlite.train --config mnist
"""
from __future__ import annotations

import copy
import importlib
import pkgutil

from ..._validate import lookup

PRESETS = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_preset(name: str) -> dict:
    """A fresh copy of the preset's CONFIG dict (edit it freely)."""
    lookup(PRESETS, name, "config preset")
    return copy.deepcopy(importlib.import_module(f"{__name__}.{name}").CONFIG)
