"""DEQ-Transformer on WikiText-103 with Jacobian regularization (Bai, Koltun, Kolter, "Stabilizing
Equilibrium Models by Jacobian Regularization", ICML 2021).

Follows ``DEQ-Sequence/wt103_deq_transformer_reg.sh`` of github.com/locuslab/deq: the model of
``wt103_deq_transformer`` (width 700, 10 heads, FFN 48,000, post-LN, adaptive input/softmax with
cutoffs 20,000 / 40,000 / 200,000, div_value 4, tied) with dropout 0.06; Anderson forward with at
most 12 iterations, Broyden adjoint with at most 13; γ = 1.9 on ‖J_f(z*)‖²_F / d (one Gaussian
probe) applied on a step with probability 0.35, none during the 32,000 warm-up steps (the
locuslab code computes it only in equilibrium mode); the rest as in the unregularized script
(Adam, lr 2.5e-4, cosine over 300,000 steps, clip 0.25, batch 56, windows of 150).

Aims for: the JR paper's WikiText-103 results, 24.5–24.9 test perplexity with 12–14 forward
NFE, about 2× faster training than the unregularized DEQ-Transformer (locuslab README: 23.8 for
its regularized weights). The pre-LN variant, ``wt103_deq_transformer_preln_reg.sh``, differs in:
``norm="pre"``, 14 forward and 14 adjoint iterations, γ = 2.0 with probability 0.4, +0.1 every
30,000 steps::

    python -m deqlite.train --config wt103_deq_transformer_jr
    python -m deqlite.train --config wt103_deq_transformer_jr --set model_options.norm=pre \\
        --set model_options.deq.max_iter=14 --set model_options.deq.backward_max_iter=14 \\
        --set jac_reg_weight=2.0 --set jac_reg_prob=0.4 --set jac_reg_increment_every=30000

Also as in the script: the memory of the previous 300 tokens (``--mem_len 300``), attention
dropout 0.01, γ raised by 0.1 every 35,000 steps (``--jac_incremental``; ``jac_reg_increment``),
the random forward cap 12 − U{0, 1, 2} of each training step (``--rand_f_thres_delta 2``;
``max_iter_jitter``), and the model's relative positions, weight norm and N(0, 0.01)
initialization of ``wt103_deq_transformer`` (whose docstring lists what still differs from the
locuslab model).
"""
import copy

from .wt103_deq_transformer import CONFIG as _BASE

CONFIG = copy.deepcopy(_BASE)
CONFIG["model_options"].update(dropout=0.06, dropatt=0.01, mem_len=300)   # --mem_len 300
CONFIG["model_options"]["deq"].update(max_iter=12, backward_max_iter=13)
CONFIG.update(
    jac_reg_weight=1.9,             # --jac_loss_weight
    jac_reg_prob=0.35,              # --jac_loss_freq
    jac_reg_probes=1,               # jac_loss_estimate(vecs=1)
    jac_reg_ramp_steps=0,
    pretrain_jac_reg_weight=0.0,    # no JR while the cell is unrolled
    jac_reg_increment=0.1,          # --jac_incremental 35000: γ += 0.1 at every multiple of
    jac_reg_increment_every=35000,  # 35,000 steps after the warm-up
    jac_reg_increment_rule="sequence",
    max_iter_jitter=2,              # --rand_f_thres_delta 2: each training step's forward cap is
    max_iter_jitter_rule="sequence",    # 12 − U{0, 1, 2}
)

