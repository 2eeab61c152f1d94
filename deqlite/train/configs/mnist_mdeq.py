"""A small multiscale DEQ (MDEQ) on MNIST-5k that trains on a laptop CPU, the run of notebook 06:
two branches (16 channels at 7×7, 32 at 4×4, after a stem that downsamples 28×28 twice), MDEQ's
head, Anderson to a relative residual of 1e-3 in at most 15 steps (forward and adjoint), 50
warm-up steps that unroll the cell 6 times, as MDEQ does, then Jacobian regularization: γ = 2
times one Hutchinson probe of ‖J‖²_F/d added to the loss on every step after the warm-up, none
during it (with γ = 0.2 during a 100-step warm-up the map went flat: 10% test accuracy).

Follows MDEQ-Vision's ``cls_mdeq_TINY.yaml`` recipe (warm-up, then JR-regularized solves) shrunk to
MNIST-5k; no published run is on MNIST. Aims for a CPU run of a few minutes whose test solves
converge within the cap (measured below: with JR they do, without they do not).

Why the regularizer: without it (``--set jac_reg_weight=0``) nearly every forward solve after the
warm-up stops at the cap above the tolerance, so the MDEQ is trained with IFT gradients at states
that are not equilibria. Measured on a 2-core CPU, one thread, the machine heavily loaded by other
jobs (3 epochs, 189 steps)::

    seed 0, JR:     80.1% test accuracy, 1000/1000 test solves converged within the cap,
                    8/139 training solves at the cap, max ρ(J) 0.79 (32 test digits), 83 s CPU
    seed 0, no JR:  82.3%, 1/1000 converged, 139/139 at the cap, max ρ(J) 1.05
    seed 1, JR:     66.4%, 981/1000 converged, 102/139 at the cap (γ = 4: 68.9%, 999/1000, 28/139)
    seed 1, no JR:  75.5%, 668/1000 converged, 139/139 at the cap

so JR brings (nearly) every test solve within the cap on both seeds, and the training solves
on seed 0 (seed 1 needs a larger γ), at an accuracy cost that varies with the seed.

Notebook 06 trains seed 0 with and without JR and prints the figures of its own run. (An MLP-cell
DEQ does better on MNIST, notebook 04: convolutional DEQs pay off on natural images and at scale.)

    python -m deqlite.train --config mnist_mdeq
"""
CONFIG = dict(
    dataset="mnist5k",
    model="mdeq_classifier",
    model_options=dict(
        channels=[16, 32], head_channels=[8, 16], final_channels=128, expansion=2, groups=4,
        dropout=0.0, weight_norm=True, downsample=2,
        deq=dict(solver="anderson", tol=1e-3, max_iter=15, backward_max_iter=15, on_fail="ignore"),
    ),
    epochs=3,
    batch_size=64,
    optimizer="adam",
    lr=5e-3,
    schedule="cosine",
    pretrain_steps=50,
    pretrain_depth=6,
    jac_reg_weight=2.0,
    jac_reg_probes=1,
    pretrain_jac_reg_weight=0.0,
    eval_jacobian_samples=32,
    seed=0,
)
