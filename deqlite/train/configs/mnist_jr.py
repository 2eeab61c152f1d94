"""MNIST-5k with Jacobian regularization (Bai, Koltun, Kolter, ICML 2021): the ``mnist`` model
started at ‖W‖₂ = 1 and trained without the unrolled warm-up, solved to a relative residual of
1e-4, with γ = 2 on ‖J_f(z*)‖²_F / d (one probe, every step). Notebook 05 checks its ``jr_loss``
exercise on this model; its experiment is ``stdlib_chars_jr`` (this MLP cell does not fail without
JR, it only solves a little slower).

Follows the JR paper's recipe (γ on ‖J_f(z*)‖²_F / d from the first step, one probe, no unrolled
warm-up) at the size of notebook 05's exercise; no published run is on MNIST. Aims for its
finding at toy size: fewer forward NFE at about the same accuracy (measured below).

    python -m deqlite.train --config mnist_jr                          # with JR
    python -m deqlite.train --config mnist_jr --set jac_reg_weight=0   # the same run without

Measured on a 2-core CPU (8 epochs, seeds 0-2, ~7 s each): with JR the test-time forward NFE is
about half (9 vs 15-18) at test accuracy within 0.4 points (96.7-97.7% vs 97.0-97.9%).
"""
import copy

from .mnist import CONFIG as _MNIST

CONFIG = copy.deepcopy(_MNIST)
CONFIG["model_options"]["weight_scale"] = 1.0
CONFIG["model_options"]["deq"].update(tol=1e-4, max_iter=60, backward_max_iter=60)
CONFIG.update(pretrain_steps=0, jac_reg_weight=2.0, jac_reg_prob=1.0, jac_reg_probes=1)
