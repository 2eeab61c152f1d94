"""deqlite: a small, readable Deep Equilibrium Model kit for learning and teaching.

    cell (weight-tied, input-injected f(z, x))  +  solver (z* = f(z*, x))  +  gradient rule (IFT)

The core is this folder: ``cells`` (and ``transformer_xl``, the published DEQ-Transformer's
block with its memory, and ``trellis``, the TrellisNet cell), ``solvers`` (``_tracker``: the
per-sample bookkeeping they share), ``gradients``, ``deq`` (the three put together;
``_checks``: what a call checks), ``stats``, ``jacobian``, ``projections``, ``jiio``,
``memory``, ``diagnostics``, ``plots``. The application (``models``, ``data``,
``train``) and the classroom (``classroom``) are subpackages that import the core, never the
other way round. See the notebooks in ``notebooks/`` for the guided tour.
"""
from .cells import MLPCell, spectral_rescale_
from .deq import DEQ
from .diagnostics import diagnose
from .gradients import BACKWARDS, DoubleBackwardError
from .solvers import SOLVERS, SolverSpec, anderson, broyden, forward_iteration, get_solver, solve
from .stats import (DEQConvergenceError, DEQConvergenceWarning, DEQNonFiniteError,
                    DEQNonFiniteWarning, SolverStats)
from .trellis import TrellisCell

__version__ = "0.1.0"

__all__ = [
    "MLPCell", "spectral_rescale_", "DEQ", "DEQConvergenceError", "DEQConvergenceWarning",
    "DEQNonFiniteError", "DEQNonFiniteWarning", "DoubleBackwardError", "diagnose", "BACKWARDS", "SOLVERS", "SolverSpec", "anderson", "broyden", "forward_iteration", "get_solver",
    "solve", "SolverStats", "TrellisCell",
]
