"""MDEQ (the paper's CIFAR-10 "large" model, 4 branches) with Jacobian regularization.

Follows ``MDEQ-Vision/experiments/cifar/cls_mdeq_LARGE_reg.yaml`` of github.com/locuslab/deq
(Bai, Koltun, Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021, on
the MDEQ of NeurIPS 2020): branches of 32/64/128/256 channels (32×32 down to 4×4), head channels
14/28/56/112, final channels 1680, expansion 5, GroupNorm with 8 groups, variational dropout 0.22,
weight normalization, no stem downsampling; Broyden with a relative stopping rule (tolerance 1e-3,
the code's default), at most 8 forward and 7 backward iterations (on the steps that add the
regularizer a cap drawn from 8 + U{−2, ..., 1}, DEQ.RAND_F_THRES_DELTA = 2 as MDEQ-Vision's
``lib/core/cls_function.py`` draws it); 16,000 warm-up steps unrolling the cell 8 times; 220
epochs, batch 96 (one GPU), Adam, lr 1e-3 with cosine decay, no weight decay; random-crop +
flip augmentation; Jacobian regularization γ = 0.4 on ‖J_f(z*)‖²_F / d (two Gaussian probes),
applied on a step with probability 0.02, none during the warm-up, and switched off after epoch
90 (LOSS.JAC_INCREMENTAL is left at its default, 10⁸ steps: γ never grows).

Aims for: the JR paper's CIFAR-10 result, MDEQ + JR: 93.1 % top-1 at 6 forward NFE, 10M
parameters. This model has 11.10M parameters; counting the layers that the YAML file describes
gives the same (~11.1M), so the paper's "10M" is presumably rounded. The unregularized MDEQ of
the same repo (``experiments/cifar/cls_mdeq_LARGE.yaml``) differs in: dropout 0.3, 18/20
iterations, 20,000 warm-up steps unrolling 10 times, batch 128 (4 GPUs × 32), no JR.

    python -m deqlite.train --config cifar10_mdeq_large_jr
"""
CONFIG = dict(
    dataset="cifar10",
    model="mdeq_classifier",
    model_options=dict(
        n_classes=10, channels=[32, 64, 128, 256], head_channels=[14, 28, 56, 112],
        final_channels=1680, expansion=5, groups=8, dropout=0.22, weight_norm=True, downsample=0,
        deq=dict(solver="broyden", tol=1e-3, stop="rel", max_iter=8, backward_max_iter=7,
                 on_fail="ignore"),
    ),
    epochs=220,
    batch_size=96,
    optimizer="adam",
    lr=1e-3,
    weight_decay=0.0,
    schedule="cosine",
    pretrain_steps=16000,
    pretrain_depth=8,
    jac_reg_weight=0.4,
    jac_reg_prob=0.02,
    jac_reg_probes=2,
    jac_reg_ramp_steps=0,
    pretrain_jac_reg_weight=0.0,    # LOSS.PRETRAIN_JAC_LOSS_WEIGHT: no JR during the warm-up
    jac_reg_stop_epoch=90,          # LOSS.JAC_STOP_EPOCH
    max_iter_jitter=2,              # DEQ.RAND_F_THRES_DELTA: forward cap 8 + U{−2..1} on JR steps
    max_iter_jitter_rule="vision",
    eval_jacobian_samples=32,
    augment=True,                   # RandomCrop(32, padding=4) + RandomHorizontalFlip
    normalize=[[0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]],    # per-channel mean, std
    lr_min=1e-6,                    # CosineAnnealingLR(eta_min=1e-6)
    eval_batch_size=96,             # TEST.BATCH_SIZE_PER_GPU (per process)
    seed=0,
)
