"""A small multiscale DEQ (MDEQ) on scikit-learn's 8×8 digits with and without Jacobian
regularization (Bai, Koltun, Kolter, ICML 2021): notebook 05's exercise 6 and
``benchmarks/bench_jr.py --preset digits_mdeq_jr`` (section 5's experiment is ``stdlib_chars_jr``).

Follows the JR paper's MDEQ recipe at toy size; no published run is on the 8×8 digits. Aims for
the paper's point that JR brings an MDEQ's solves within their cap where the unregularized
model's stay above it (measured below, with what it shows and what it does not).

MDEQ's recipe at toy size: two branches (16 channels at 8×8, 32 at 4×4; the stem keeps the 8×8
image), MDEQ's head, Anderson to a relative residual of 1e-3 in at most 15 steps (forward and
adjoint), and a warm-up of 46 steps (two epochs) that trains the cell unrolled 6 times, as MDEQ
pretrains; then 3 epochs of solves. JR: γ = 1 on ‖J_f(z*)‖²_F / d (one probe, every step after
the warm-up; none during it).

What it shows: the warm-up trains a 6-layer weight-tied network whose map expands (ρ(J) > 1 at
its output), and the first solves after it mostly stop at the cap. Without JR, training on those
unconverged solves rarely repairs it; with JR the solves converge within an epoch or two.

Measured with ``benchmarks/bench_jr.py`` (seeds 0-2, one CPU thread on a loaded 2-core machine: ~40 s of CPU per run): at
the first evaluation after the warm-up 0-12% of 64 test digits converge and max ρ(J) is 1.12-1.98
(the same in both settings). At the end, without JR 0%, 3% and 78% converge (final max ρ(J) 1.37,
1.88, 0.87), test forward NFE 15.0 (the cap) in every run, accuracy 90.5-94.4%; with JR 98-100%
converge (max ρ(J) 1.16, 0.82, 0.79), NFE 12.9-14.9, accuracy 78.0-93.3% (seed 0 still catching
up after 5 epochs); longer runs (``--set epochs=10``) give JR time to catch up.

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
