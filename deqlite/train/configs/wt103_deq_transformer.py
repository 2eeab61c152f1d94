"""DEQ-Transformer on WikiText-103 (Bai, Kolter, Koltun, "Deep Equilibrium Models", NeurIPS 2019).

Follows ``DEQ-Sequence/wt103_deq_transformer.sh`` of github.com/locuslab/deq (and the defaults of
its ``train_transformer.py``): one weight-tied post-LN block of width 700 with 10 heads of 70
features and a feed-forward width of 48,000; adaptive input and adaptive softmax with cutoffs
20,000 / 40,000 / 200,000 and div_value 4, input and output embeddings tied; dropout 0.05, no
attention dropout; Anderson forward (relative residual 1e-3, the code's default, memory 6, at most
30 iterations), Broyden adjoint (at most 35; the README's command uses 40); 32,000 warm-up steps
unrolling the cell twice (``--n_layer 2``); windows of 150 tokens, batch 56 (4 GPUs); Adam, lr
2.5e-4 with cosine decay to 0 over 300,000 steps (~24 epochs), gradient norm clipped at 0.25.
No Jacobian regularization (see ``wt103_deq_transformer_jr`` for the ICML 2021 recipe).

Aims for: the paper's DEQ-Transformer (medium) result on WikiText-103, 23.2 test perplexity with
3.7 GB of training memory, against Transformer-XL's 23.6 at 9.0 GB (the locuslab README: ~23.8
with this script, 23.1 for the released weights). This model has 96,448,350 parameters (the
FFN: 67.3M with its weight-norm gains; the rest of the block: 3.9M; the tied adaptive
embeddings and softmax: 25.2M).

    python -m deqlite.train --config wt103_deq_transformer      # needs WikiText-103 and a GPU

The block is ``deqlite.transformer_xl.TransformerXLCell``, locuslab's: Transformer-XL's relative-position
attention with the learned global biases (``positions="relative"``), a memory of the equilibrium
states of the previous 150 tokens (``mem_len``, also in evaluation), the input injected into the
attention's queries, keys and values, weight norm on the block's maps (``--wnorm``), N(0, 0.01)
initialization (``--init_std``; LayerNorm gains N(1, 0.01)).

Differences from the locuslab model that remain: its LayerNorms inside the block have no
learned gain and bias (``F.layer_norm``), deqlite's do (2,800 parameters), and deqlite puts a
final LayerNorm on z* before the output layer; its adaptive embedding has a projection for every
cluster, the shortlist's included, where deqlite's (``AdaptiveInput``) reads the adaptive
softmax's weights; it also drops out the distance encodings (deqlite does not); its
evaluation during the warm-up would unroll the cell 24 times
(``--eval_n_layer``) but only at train step 0, which the script never evaluates.
"""
CONFIG = dict(
    dataset="wikitext103",
    model="deq_transformer_lm",
    model_options=dict(
        d_model=700, n_heads=10, d_ff=48000, max_len=150, dropout=0.05, norm="post",
        positions="relative", tie_weights=True, cutoffs=[20000, 40000, 200000], div_value=4.0,
        mem_len=150,                # --mem_len 150: the states of the previous 150 tokens
        dropatt=0.0,                # --dropatt 0.0
        weight_norm=True,           # --wnorm
        init_std=0.01,              # --init_std 0.01 (--init normal)
        deq=dict(solver="anderson", tol=1e-3, stop="rel", max_iter=30, solver_options=dict(m=6),
                 backward_solver="broyden", backward_max_iter=35, on_fail="ignore"),
    ),
    seq_len=150,                    # --tgt_len 150
    epochs=25,                      # max_steps ends the run first
    max_steps=300000,               # --max_step
    batch_size=56,
    eval_batch_size=16,             # max(16, number of GPUs)
    optimizer="adam",
    lr=2.5e-4,
    weight_decay=0.0,
    schedule="cosine",
    lr_min=0.0,                     # --eta_min
    grad_clip=0.25,                 # --clip
    lr_warmup_steps=16000,          # --warmup_step: lr rises linearly, then follows the cosine
    pretrain_steps=32000,
    pretrain_depth=2,               # --n_layer 2
    pretrain_eval_depth=None,       # as in training (2): the model reads --eval_n_layer 24 only
                                    # for an evaluation at train_step 0, which the script never runs
    jac_reg_weight=0.0,
    eval_jacobian_samples=0,        # the spectral radius is off by default there too
    seed=1111,                      # --seed's default
)

