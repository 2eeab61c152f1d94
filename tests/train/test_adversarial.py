"""Adversarial training with JIIO and PGD-k (deqlite.train.adversarial): the attacks stay inside the
ball and the box and raise the loss, their evaluation counts are exact, adversarial training makes
a tiny DEQ classifier more robust than standard training does, and bad arguments fail loudly."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deqlite import DEQ
from deqlite.data import load_dataset
from deqlite.train.adversarial import (Attack, adversarial_training, random_start,
                                       robust_accuracy, training_step)

from conftest import CountingCell

EPS = 1.0                  # L2 radius on scikit-learn's 8×8 digits (a digit's norm is about 3.9)


class TinyClassifier(nn.Module):
    """stem (flatten) → DEQ over an MLPCell → linear head: DEQClassifier's interface, no convs."""

    def __init__(self, hidden=32):
        super().__init__()
        self.stem = nn.Flatten()
        self.cell = CountingCell(64, hidden, weight_scale=0.7)
        self.deq = DEQ(self.cell, solver="forward_iteration", tol=1e-3, max_iter=20,
                       on_fail="ignore")
        self.head = nn.Linear(hidden, 10)

    def forward(self, images):
        return self.head(self.deq(self.stem(images)))


@pytest.fixture(scope="module")
def digits():
    train = load_dataset("digits", "train")
    x, y = load_dataset("digits", "test").tensors
    return train, x[:128], y[:128]


def train(digits, attack, seed, steps=30):
    torch.manual_seed(seed)
    model = TinyClassifier()
    adversarial_training(model, digits[0], attack, steps=steps, batch_size=64, lr=1e-2,
                         seed=seed, progress=False)
    return model


@pytest.fixture(scope="module")
def standard(digits):
    return {seed: train(digits, None, seed) for seed in (0, 1)}


ATTACKS = {"pgd": Attack("pgd", EPS, 3),
           "pgd from a random start": Attack("pgd", EPS, 3, random_start=True),
           "jiio": Attack("jiio", EPS, 8, 1.0),
           "jiio from a random start": Attack("jiio", EPS, 8, 1.0, random_start=True)}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_attacks_stay_in_the_ball_and_the_box_and_raise_the_loss(digits, standard, attack):
    model, (_, x, y) = standard[0], digits
    adv = attack(model, x, y, generator=torch.Generator().manual_seed(0))
    assert adv.x.shape == x.shape and not adv.x.requires_grad
    assert (adv.x - x).flatten(1).norm(dim=1).max() <= EPS * (1 + 1e-5)
    assert adv.x.min() >= 0 and adv.x.max() <= 1
    with torch.no_grad():
        before = F.cross_entropy(model(x), y, reduction="none")
        after = F.cross_entropy(model(adv.x), y, reduction="none")
    assert after.mean() > before.mean() + 0.5            # a real attack, not a nudge
    assert (after > before).float().mean() > 0.8


def test_a_random_start_lies_in_the_ball_and_the_box_and_fills_it():
    clean = torch.rand(200, 1, 8, 8) * 0.5 + 0.25
    x = random_start(clean, 0.5, generator=torch.Generator().manual_seed(1))
    r = (x - clean).flatten(1).norm(dim=1)
    assert r.max() <= 0.5 * (1 + 1e-6) and x.min() >= 0 and x.max() <= 1
    assert r.min() > 0.3                  # uniform in 64 dimensions: almost all near the sphere


def test_evaluation_counts_are_exact(digits, standard):
    model, (_, x, y) = standard[1], digits
    x, y = x[:16], y[:16]
    for attack in (Attack("jiio", EPS, 7, 1.0), Attack("pgd", EPS, 3)):
        model.cell.forwards = model.cell.backwards = 0
        adv = attack(model, x, y)
        assert adv.f_evals == model.cell.forwards and adv.vjps == model.cell.backwards
        assert adv.evaluations == adv.f_evals + adv.vjps
        if attack.method == "jiio":
            assert (adv.f_evals, adv.vjps) == (7, 7)      # one f and one VJP per iteration
        else:
            assert adv.f_evals > 2 * 3 and adv.vjps > 2 * 3   # each step: two solves, +1 each
    model.cell.forwards = model.cell.backwards = 0
    record = training_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y, None)
    forwards, backwards = model.cell.forwards, model.cell.backwards
    with torch.no_grad():                    # the record's clean-accuracy probe: not training work
        model(x)
    probe = model.deq.forward_stats.nfe
    assert record["attack_evals"] == 0
    assert record["train_evals"] == record["fwd_nfe"] + 1 + record["bwd_nfe"] + 1
    assert (forwards, backwards) == (probe + record["fwd_nfe"] + 1, record["bwd_nfe"] + 1)


@pytest.mark.parametrize("method", ["pgd", "jiio"])
def test_adversarial_training_is_more_robust_than_standard_training(digits, standard, method):
    attack = Attack("pgd", EPS, 2) if method == "pgd" else Attack("jiio", EPS, 6, 1.0)
    _, x, y = digits
    for seed, reference in standard.items():
        robust = robust_accuracy(train(digits, attack, seed), x, y, eps=EPS, steps=10,
                                 step_sizes=(EPS / 4,), restarts=0)
        plain = robust_accuracy(reference, x, y, eps=EPS, steps=10, step_sizes=(EPS / 4,),
                                restarts=0)
        assert plain["robust"] < 0.12 and plain["clean"] > 0.6
        assert robust["robust"] > plain["robust"] + 0.1, (seed, robust, plain)


def test_training_records_and_callback(digits):
    seen = []
    model = TinyClassifier()
    history = adversarial_training(model, digits[0], Attack("pgd", EPS, 1), steps=3,
                                   batch_size=32, callback=seen.append, progress=False)
    assert seen == history and [r["step"] for r in history] == [1, 2, 3]
    for key in ("loss", "acc", "clean_acc", "attack_evals", "train_evals", "attack_seconds",
                "seconds", "fwd_nfe", "bwd_nfe", "epoch", "split"):
        assert key in history[-1], key
    assert all(r["attack_evals"] > 0 and r["seconds"] >= r["attack_seconds"] for r in history)


def test_strong_pgd_is_at_least_as_strong_as_each_of_its_runs(digits, standard):
    model, (_, x, y) = standard[0], digits
    one = robust_accuracy(model, x, y, eps=EPS, steps=5, step_sizes=(EPS / 4,), restarts=0)
    more = robust_accuracy(model, x, y, eps=EPS, steps=5, step_sizes=(EPS / 4, EPS / 10),
                           restarts=1)
    assert more["robust"] <= one["robust"] <= one["clean"] == more["clean"]
    assert more["evaluations"] > 3 * one["evaluations"]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="fgsm", eps=1.0, steps=1), ValueError, "unknown attack method"),
    (dict(method="pdg", eps=1.0, steps=1), ValueError, "Did you mean 'pgd'"),
    (dict(method="pgd", eps=0.0, steps=1), ValueError, "eps"),
    (dict(method="pgd", eps=-1.0, steps=1), ValueError, "eps"),
    (dict(method="pgd", eps=float("inf"), steps=1), ValueError, "finite"),
    (dict(method="pgd", eps=float("nan"), steps=1), ValueError, "eps"),
    (dict(method="pgd", eps=1.0, steps=0), ValueError, "steps"),
    (dict(method="pgd", eps=1.0, steps=2.5), TypeError, "steps"),
    (dict(method="jiio", eps=1.0, steps=5), ValueError, "step_size"),
    (dict(method="pgd", eps=1.0, steps=2, step_size=0.0), ValueError, "step_size"),
    (dict(method="pgd", eps=1.0, steps=2, random_start="yes"), TypeError, "random_start"),
    (dict(method="pgd", eps=1.0, steps=2, box=(1.0, 0.0)), ValueError, "low < high"),
    (dict(method="pgd", eps=1.0, steps=2, box=(0.0,)), ValueError, "box"),
])
def test_bad_attacks_fail_loudly(kwargs, error, match):
    with pytest.raises(error, match=match):
        Attack(**kwargs)


def test_bad_calls_fail_loudly(digits):
    model, (train_set, x, y) = TinyClassifier(), digits
    attack = Attack("pgd", EPS, 1)
    with pytest.raises(TypeError, match="stem"):
        attack(nn.Linear(64, 10), x, y)
    with pytest.raises(ValueError, match="same number of samples"):
        attack(model, x, y[:5])
    with pytest.raises(ValueError, match="steps"):
        adversarial_training(model, train_set, attack, steps=0, progress=False)
    with pytest.raises(TypeError, match="Attack"):
        adversarial_training(model, train_set, "pgd", steps=1, progress=False)
    with pytest.raises(ValueError, match="lr"):
        adversarial_training(model, train_set, attack, steps=1, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="restarts"):
        robust_accuracy(model, x, y, eps=EPS, restarts=-1)
    with pytest.raises(ValueError, match="eps"):
        robust_accuracy(model, x, y, eps=0.0)
