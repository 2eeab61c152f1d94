"""A tiny character-level DEQ-Transformer on Python's standard library that grows harder to solve
as it trains, unless Jacobian regularization (Bai, Koltun, Kolter, ICML 2021) holds it: the
experiment of notebook 05, section 5, and of ``benchmarks/bench_jr.py``.

Follows the JR paper's DEQ-Transformer experiment (with and without JR) at toy size; no published
run is on this corpus. Aims for the paper's finding: without JR the forward NFE grows through
training, with it the NFE stays level (measured below, seed by seed).

The paper motivates JR with its large models, the DEQ-Transformer on WikiText-103 among them,
whose forward NFE climbs through training until solves hit their cap. This is that model
(``deq_transformer_lm``, notebook 07) shrunk until a run takes about 20 s on one CPU thread: one
weight-tied post-LN block of width 32,
2 heads, feed-forward width 64, windows of 32 characters, tied embeddings; Anderson with memory 2
to a relative residual of 1e-3, at most 30 forward and 30 adjoint iterations; batch 16, Adam at a
constant lr 8e-3 (high for this model, which is what makes the plain DEQ drift), gradient norm
clipped at 1, 200 steps; no warm-up, so the two settings of a seed start from the same model and
the same first solve. An evaluation every 20 steps on 4,096 validation characters records the test
forward NFE, and ρ(J) and the converged share on 16 windows. JR: γ = 1, one probe, every step.

Measured (seeds 0-2, one CPU thread, ``benchmarks/bench_jr.py``; table in benchmarks/README.md):
without JR the mean training forward NFE goes from 8-9 over the first 20 steps to 11-24 over the
last 20 (seed 1 reaches the cap at about step 100), the final test NFE is 19.5/30/30 and the final
max ρ(J) at z* 1.2/4.0/5.7; with JR the training NFE falls to 5.8-7.0, the final test NFE is
6.5-7.5, ρ(J) stays below 1 at most evaluations (final 1.42/0.49/0.64: seed 0's last one is the
exception) and the runs are about 1.5× faster.
200 steps are enough for the model to learn the characters' frequencies and little more (both
settings end near the unigram's 4.5 bits per character, JR 0.08 bits worse), so read this as a
picture of the solver, not of a language model: notebook 07 trains one.

    python -m deqlite.train --config stdlib_chars_jr                          # with JR
    python -m deqlite.train --config stdlib_chars_jr --set jac_reg_weight=0   # the same run without
"""
CONFIG = dict(
    dataset="stdlib_chars",
    model="deq_transformer_lm",
    model_options=dict(
        d_model=32, n_heads=2, d_ff=64, max_len=32, dropout=0.0, norm="post",
        positions="learned", tie_weights=True,
        deq=dict(solver="anderson", solver_options=dict(m=2), tol=1e-3, stop="rel", max_iter=30,
                 backward_max_iter=30, on_fail="ignore"),
    ),
    seq_len=32,
    epochs=1,                       # max_steps ends the run first
    max_steps=200,
    batch_size=16,
    eval_batch_size=64,
    limit_test=4096,                # validation characters per evaluation
    eval_every=20,
    optimizer="adam",
    lr=8e-3,
    schedule="constant",
    grad_clip=1.0,
    pretrain_steps=0,
    jac_reg_weight=1.0,
    jac_reg_prob=1.0,
    jac_reg_probes=1,
    eval_jacobian_samples=16,
    seed=0,
)
