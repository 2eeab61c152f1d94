"""MNIST-5k (offline, 4,000 train / 1,000 test) with a conv stem and an MLP-cell DEQ.

Follows no published run (MNIST is in none of the DEQ papers): the papers' recipe, an unrolled
warm-up and then Anderson solves, on the offline MNIST-5k, for notebook 04.

Aims for ≥ 96% test accuracy in a few minutes on a 2-core CPU. The warm-up trains the cell
unrolled 6 times for the first epoch, as the DEQ papers pretrain, then switches to Anderson.
"""
CONFIG = dict(
    dataset="mnist5k",
    model="deq_classifier",
    model_options=dict(
        channels=16, hidden=128, weight_scale=0.7,
        deq=dict(solver="anderson", tol=1e-3, max_iter=30, solver_options=dict(m=5),
                 backward_tol=1e-3, backward_max_iter=30, on_fail="ignore"),
    ),
    epochs=8,
    batch_size=64,
    optimizer="adam",
    lr=2e-3,
    weight_decay=0.0,
    schedule="cosine",
    pretrain_steps=63,
    pretrain_depth=6,
    seed=0,
)
