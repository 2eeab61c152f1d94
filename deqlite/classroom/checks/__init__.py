"""Checks for the notebooks' exercises: run the student's function on several families of inputs,
compare it with what the math says, and say what is wrong in words a student can act on.

A notebook calls a check on the student's function and keeps what it returns:

    weight_tied_forward = checks.check_weight_tied_forward(weight_tied_forward)

* right: a one-line confirmation (✓), and the student's function comes back;
* not written yet (its body is still only ``raise NotImplementedError()``, as in the generated
  student notebooks): the check says so and hands back deqlite's reference implementation
  (``deqlite.classroom.references``), so the rest of the notebook still runs;
* wrong: ``CheckFailed``. In JupyterLab it shows as a short marked message, not a traceback: what
  failed, on which input, expected against got (the first entry off, with all its digits), and a
  hint chosen by the sub-test that failed.

Every call of the student's function goes through ``_call``, which holds the rules common to all
exercises:

* an argument changed in place (``z0 += ...``, ``grad.mul_(...)``) is a mistake even when the
  answer is right: the caller's tensor is not the student's to change, and later cells break;
* ``NotImplementedError`` raised after the student's own code started running is a failure (the
  ``raise`` line was left in below finished code), not "not written yet";
* deqlite's reference itself (what an earlier run of the check handed back) is not an answer;
* converting the result (to a number, a pair, ...) happens inside the guarded call, so a wrong
  kind of result is reported in words, not as a traceback from this module;
* the callables handed to the student (``f``, ``vjp``, ``matvec``) count their calls, so a solver
  that evaluates f twice per step or ignores ``max_iter`` is caught, and a loop that never stops
  is stopped.

The harness is ``_harness.py``; each notebook's checks are in ``nbNN.py``, and its reference
implementations in ``deqlite.classroom.references``. ``checks.graded(name)`` is the autograder's test (nbgrader, a hidden test after each check): it
passes only when the student's own function passed its check.
"""
from __future__ import annotations

from ._harness import (DT, EXERCISES, VERDICTS, CheckFailed, NotWrittenYet, exercise,  # noqa: F401
                       graded, reference)
from . import nb01, nb02, nb03, nb04, nb05, nb06, nb07, nb08, nb09, nb10

# every check_<name> of the notebooks' modules, as checks.check_<name> (what the notebooks call)
for _module in (nb01, nb02, nb03, nb04, nb05, nb06, nb07, nb08, nb09, nb10):
    globals().update({_n: getattr(_module, _n) for _n in dir(_module) if _n.startswith("check_")})
