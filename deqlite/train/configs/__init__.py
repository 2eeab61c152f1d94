"""Named training presets: each module here defines ``CONFIG``, a dict of ``TrainConfig`` fields.

    python -m deqlite.train --config mnist --set epochs=2 --set model_options.hidden=64
    load_preset("mnist", ["epochs=2", "model_options.hidden=64"])      # the same, in Python
"""
from __future__ import annotations

import copy
import importlib
import json
import pkgutil
from typing import Sequence

from ..._validate import lookup

PRESETS = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def parse_overrides(items: Sequence[str]) -> dict:
    """``["epochs=3", "model_options.hidden=64"]`` → a nested dict; each value is read as JSON
    when it parses (numbers, true/false/null, lists, dicts), as a string otherwise."""
    out: dict = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"an override is KEY=VALUE, e.g. epochs=3; got {item!r}.")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    """`base` with the values of `extra`, nested dicts merged key by key."""
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return merged


def load_preset(name: str, overrides: Sequence[str] = ()) -> dict:
    """A fresh copy of the preset's CONFIG dict (edit it freely), with ``KEY=VALUE`` overrides
    applied as the command line's ``--set`` applies them."""
    lookup(PRESETS, name, "config preset")
    config = copy.deepcopy(importlib.import_module(f"{__name__}.{name}").CONFIG)
    return merge(config, parse_overrides(overrides)) if overrides else config
