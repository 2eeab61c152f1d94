"""deqlite: a small, readable Deep Equilibrium Model kit for learning and teaching.

    cell (weight-tied, input-injected f(z, x))  +  solver (z* = f(z*, x))  +  gradient rule (IFT)

See the notebooks in ``notebooks/`` for the guided tour.
"""
from .cells import MLPCell, spectral_rescale_
from .deq import DEQ, DEQConvergenceError, DEQConvergenceWarning
from .diagnostics import diagnose
from .solvers import SOLVERS, anderson, broyden, forward_iteration, get_solver, solve
from .stats import SolverStats

__version__ = "0.1.0"

__all__ = [
    "MLPCell", "spectral_rescale_", "DEQ", "DEQConvergenceError", "DEQConvergenceWarning", "diagnose",
    "SOLVERS", "anderson", "broyden", "forward_iteration", "get_solver", "solve", "SolverStats",
]
