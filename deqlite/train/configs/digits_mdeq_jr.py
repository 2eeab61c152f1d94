"""A small multiscale DEQ (MDEQ) on scikit-learn's 8×8 digits with and without Jacobian
regularization (Bai, Koltun, Kolter, ICML 2021): the experiment of notebook 05, section 5, and of
``benchmarks/bench_jr.py``.

MDEQ's recipe at toy size: two branches (16 channels at 8×8, 32 at 4×4; the stem keeps the 8×8
image), MDEQ's head, Anderson to a relative residual of 1e-3 in at most 15 steps (forward and
adjoint), and a warm-up of 46 steps (two epochs) that trains the cell unrolled 6 times, as MDEQ
pretrains; then 3 epochs of solves. JR: γ = 1 on ‖J_f(z*)‖²_F / d (one probe, every step after
the warm-up; none during it).

What it shows: the warm-up trains a 6-layer weight-tied network whose map expands (ρ(J) > 1 at
its output), and the first solves after it do not converge. Without JR, training on those
unconverged solves does not repair it; with JR, ρ(J) drops below 1 within an epoch and the solves
converge, at a similar accuracy.

Measured on a 2-core CPU, one thread (seed 0; ~25 s of CPU per run): at the first evaluation
after the warm-up 0 of 64 test digits converge and ρ(J) ≤ 1.35 in both settings; at the end,
without JR 0% converge (forward NFE at the cap of 15, ρ(J) max 1.33), with JR 89-100% (ρ max
0.79), test accuracy within a few points. Three seeds: ``benchmarks/bench_jr.py``.

    python -m deqlite.train --config digits_mdeq_jr                          # with JR
    python -m deqlite.train --config digits_mdeq_jr --set jac_reg_weight=0   # the same run without
"""
CONFIG = dict(
    dataset="digits",
    model="mdeq_classifier",
    model_options=dict(
        channels=[16, 32], head_channels=[8, 16], final_channels=128, expansion=2, groups=4,
        dropout=0.0, weight_norm=True, downsample=1,
        deq=dict(solver="anderson", tol=1e-3, max_iter=15, backward_max_iter=15, on_fail="ignore"),
    ),
    epochs=5,                        # 23 steps an epoch (1,437 training digits, batches of 64)
    batch_size=64,
    eval_batch_size=40,              # test NFE: the mean over 9 batches, not the slowest of 360
    optimizer="adam",
    lr=5e-3,
    schedule="cosine",
    pretrain_steps=46,
    pretrain_depth=6,
    jac_reg_weight=1.0,
    jac_reg_prob=1.0,
    jac_reg_probes=1,
    pretrain_jac_reg_weight=0.0,
    eval_jacobian_samples=64,
    seed=0,
)
