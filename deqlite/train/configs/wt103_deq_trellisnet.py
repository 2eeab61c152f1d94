"""DEQ-TrellisNet on WikiText-103 (Bai, Kolter, Koltun, "Deep Equilibrium Models", NeurIPS 2019).

Follows ``DEQModel/run_wt103_deq_trellisnet.sh`` of github.com/locuslab/deq (commit 01fd271, and
the defaults of its ``train_trellisnet.py``): word embeddings of width 500 (``--d_embed``), a
TrellisNet layer whose h and c have 1,500 + 500 = 2,000 features (``--nhid 1500 --nout 500``; the
output is h's last 500), kernel size 2, weight normalization, input and output embeddings tied;
variational dropout 0.1 on the input, the output and h (``--dropouti``, ``--dropout``,
``--dropouth``); the forward and backward solves capped at 45 iterations (``--f_thres 45
--b_thres 45``) with locuslab's stopping rule, ‖g‖ ≤ 1e-6 · √(batch · T · 4,000) for the whole
batch, here per sample: an absolute residual of 1e-6 · √(100 · 4,000) ≈ 6.3e-4 (adjoint 2e-10 ·
√(...) ≈ 1.3e-7); 30,000 warm-up steps unrolling the layer 40 times (``--pretrain_steps 30000
--n_layer 40``: the warm-up runs ``n_layer`` layers); windows of 100 tokens, batch 49 (4 GPUs);
Adam at lr 1e-3, gradient norm clipped at 0.07, 25 epochs; the softmax split at 2,800 / 20,000 /
76,000 (``cutoffs``, locuslab's ``SplitCrossEntropyLoss``).

Aims for: the paper's DEQ-TrellisNet result on WikiText-103, 29.0 test perplexity with about 180M
parameters (as Papers with Code lists the paper's WikiText-103 table; the locuslab README gives no
DEQ-TrellisNet figure). This deqlite model has 174,651,000 parameters (the tied softmax and
embedding 134.6M, the hidden convolution 32.0M, the injection 8.0M); locuslab's model as this
script builds it has 174,168,738 by count of its code (embedding 133.9M, decoder bias 0.27M, the
two convolutions with their weight-norm gains 40.0M, the split softmax's tail vectors 1,503).

    python -m deqlite.train --config wt103_deq_trellisnet      # needs WikiText-103 and a GPU

Differences from the locuslab model:

* the softmax: torch's adaptive softmax with locuslab's cutoffs and ``div_value=1`` (every word a
  full 500-wide vector, as in the split softmax), which adds a 500×500 projection per tail
  cluster (+750,000) and has no per-word or per-cluster bias (−267,738); the input embedding
  reads its weights (``AdaptiveInput``) and is scaled by √500 (locuslab's: unscaled, initialized
  U(−0.1, 0.1));
* no memory of the previous segment: locuslab pads each window with the last [h; c] of the one
  before (its ``mems``); here every window starts from zeros;
* the whole window is solved at once (as locuslab's module does: its piece-by-piece solve over
  ``--subseq_len`` is commented out), by deqlite's Broyden with a per-sample stopping rule, and
  the gradient is deqlite's IFT;
* the learning rate stays at 1e-3: locuslab divides it by 10 at epochs 15, 20 and 23 (``--when``)
  and after any epoch whose validation loss is above the best of the epochs before the last 5
  (``--anneal 5``), a schedule deqlite has no setting for.

As in locuslab: the input convolution keeps PyTorch's default initialization and the hidden one
starts at N(0, 0.01); evaluations during the warm-up unroll 40 times too.
"""
CONFIG = dict(
    dataset="wikitext103",
    model="deq_trellisnet_lm",
    model_options=dict(
        d_model=500, d_hidden=2000, kernel_size=2, max_len=100, dropout=0.1, dropout_hidden=0.1,
        weight_norm=True, tie_weights=True, cutoffs=[2800, 20000, 76000], div_value=1.0,
        deq=dict(solver="broyden", tol=6.3e-4, stop="abs", max_iter=45, backward_tol=1.3e-7,
                 backward_max_iter=45, on_fail="ignore"),
    ),
    seq_len=100,                    # --seq_len 100
    epochs=25,                      # --epochs' default
    batch_size=49,
    eval_batch_size=4,              # train_trellisnet.py's eval_batch_size
    optimizer="adam",
    lr=1e-3,
    weight_decay=0.0,
    schedule="constant",            # locuslab: ÷10 at epochs 15, 20, 23 (docstring)
    grad_clip=0.07,                 # --clip
    pretrain_steps=30000,
    pretrain_depth=40,              # --n_layer 40: the warm-up runs n_layer layers
    pretrain_eval_depth=None,       # as in training: evaluate() also checks train_step
    jac_reg_weight=0.0,
    eval_jacobian_samples=0,
    seed=1111,                      # --seed's default
)
