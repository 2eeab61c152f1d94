"""MDEQ-Small on ImageNet (224×224) with Jacobian regularization.

Follows ``MDEQ-Vision/experiments/imagenet/cls_mdeq_SMALL_reg.yaml`` of github.com/locuslab/deq
(Bai, Koltun, Kolter, "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021, on
the MDEQ of NeurIPS 2020): a stem that downsamples twice (224 → 56), branches of 32/64/128/256
channels (56×56 down to 7×7), head channels 28/56/112/224, final channels 2048, expansion 5,
GroupNorm with 8 groups, variational dropout 0.02, weight normalization; Broyden with an absolute
stopping rule (tolerance 1e-3, the code's default), at most 14 forward and 14 backward
iterations (on the steps that add the regularizer a forward cap drawn from 14 + U{−2, ..., 1},
DEQ.RAND_F_THRES_DELTA = 2); 510,000 warm-up steps unrolling the cell 5 times; 100 epochs,
batch 128 (4 GPUs × 32), SGD with Nesterov momentum 0.9, lr 0.04 with cosine decay, weight decay 2e-5;
RandomResizedCrop + flip; Jacobian regularization γ = 2.5 on ‖J_f(z*)‖²_F / d (two Gaussian
probes), applied on a step with probability 0.08, γ growing by 0.1 every 50,000 steps after the
warm-up (LOSS.JAC_INCREMENTAL; counted from the warm-up's end, as MDEQ-Vision's
``lib/core/cls_function.py`` does), and γ = 0.03 during the warm-up.

Aims for: the JR paper's ImageNet result, MDEQ-small + JR: 74.5 % top-1 at 14 forward NFE,
17M parameters. This model has 18.62M parameters (2.05M of them in the final linear layer);
counting the layers that the YAML file describes gives the same.

    python -m deqlite.train --config imagenet_mdeq_small_jr

``amp="bf16"`` and ``channels_last`` are not published (the paper trained in float32):
they are deqlite's choice for speed on current GPUs; set ``--set amp=none`` to match.
"""
CONFIG = dict(
    dataset="imagenet",
    model="mdeq_classifier",
    model_options=dict(
        n_classes=1000, channels=[32, 64, 128, 256], head_channels=[28, 56, 112, 224],
        final_channels=2048, expansion=5, groups=8, dropout=0.02, weight_norm=True, downsample=2,
        deq=dict(solver="broyden", tol=1e-3, stop="abs", max_iter=14, backward_max_iter=14,
                 on_fail="ignore"),
    ),
    epochs=100,
    batch_size=128,
    optimizer="sgd",
    lr=0.04,
    weight_decay=2e-5,
    schedule="cosine",
    pretrain_steps=510000,
    pretrain_depth=5,
    jac_reg_weight=2.5,
    jac_reg_prob=0.08,
    jac_reg_probes=2,
    jac_reg_ramp_steps=0,
    pretrain_jac_reg_weight=0.03,   # LOSS.PRETRAIN_JAC_LOSS_WEIGHT
    jac_reg_increment=0.1,          # LOSS.JAC_INCREMENTAL: γ = 2.5 + 0.1 · ⌊(k − 510,000) / 50,000⌋
    jac_reg_increment_every=50000,
    jac_reg_increment_rule="vision",
    max_iter_jitter=2,              # DEQ.RAND_F_THRES_DELTA: forward cap 14 + U{−2..1} on JR steps
    max_iter_jitter_rule="vision",
    eval_jacobian_samples=8,
    optimizer_options=dict(momentum=0.9, nesterov=True),     # TRAIN.MOMENTUM, TRAIN.NESTEROV
    augment=True,                   # RandomResizedCrop(224) + RandomHorizontalFlip; test:
                                    # Resize(256) + CenterCrop(224); ImageNet mean/std
    lr_min=1e-6,                    # CosineAnnealingLR(eta_min=1e-6)
    eval_batch_size=32,             # TEST.BATCH_SIZE_PER_GPU (per process)
    amp="bf16", channels_last=True,  # not published (fp32 there): for speed on current GPUs
    seed=0,
)
