"""Training and evaluating with a Transformer-XL memory (deqlite.train.tasks): the memory goes on
from step to step along each row of the token stream and starts empty where a row starts; an
evaluation carries its own, so that scoring the held-out text segment by segment equals scoring
each row at once; a run with a memory resumes exactly (the memory is in the checkpoint)."""
import pytest
import torch
from test_trainer import assert_same_run, interrupted_and_resumed

from deqlite.data.batches import _rows
from deqlite.train import Trainer
from deqlite.train.checkpoint import load_checkpoint

T = 16


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def xl_config(tmp_path, **overrides):
    """A tiny DEQ-Transformer with relative positions and a memory of 24 tokens, on 4 rows of 3
    windows of the stdlib characters (an epoch is 3 steps)."""
    config = dict(dataset="stdlib_chars", limit_train=4 * 3 * T + 1, limit_test=2 * 3 * T + 1,
                  seq_len=T, model="deq_transformer_lm", batch_size=4, eval_batch_size=2,
                  model_options=dict(d_model=16, n_heads=2, d_ff=32, positions="relative",
                                     mem_len=24, dropout=0.1, dropatt=0.1,
                                     deq=dict(solver="anderson", tol=1e-4, max_iter=20,
                                              on_fail="ignore")),
                  epochs=3, max_steps=8, eval_every=4, lr=3e-3, eval_jacobian_samples=2,
                  log_path=str(tmp_path / "xl.jsonl"), checkpoint_path=str(tmp_path / "xl.pt"))
    config.update(overrides)
    return config


def memory_lengths(trainer):
    """Record, at every call of the model's loss, how many tokens of memory it was given."""
    seen, loss = [], trainer.model.loss

    def spy(tokens, targets, memory=None):
        seen.append((trainer.model.training, None if memory is None else memory.z.shape[1]))
        return loss(tokens, targets, memory=memory)

    trainer.model.loss = spy
    return seen


def test_the_memory_goes_on_along_each_row_and_restarts_with_it(tmp_path):
    """(Under bf16 autocast: the memory keeps the dtype the injection has there.)"""
    trainer = Trainer(xl_config(tmp_path, eval_every=0, max_steps=7, checkpoint_path=None,
                                eval_jacobian_samples=0, amp="bf16"))
    assert trainer.steps_per_epoch == 3
    seen = memory_lengths(trainer)
    trainer.fit(progress=False)
    train = [m for training, m in seen if training]
    assert train == [None, 16, 24] * 2 + [None]               # an epoch: the rows start again
    evaluations = [m for training, m in seen if not training]
    assert evaluations == [None, 16, 24] * 3                   # each evaluation from the start


def test_segment_by_segment_evaluation_scores_each_row_as_a_whole(tmp_path):
    """The held-out split in 2 rows of 48 characters, read in 3 windows of 16 with a memory of
    32: the loss equals the model's on each 48-character row read at once (up to the solver's
    tolerance); without the memory it does not."""
    options = dict(xl_config(tmp_path)["model_options"], max_len=3 * T, eval_mem_len=2 * T,
                   dropout=0.0, dropatt=0.0,
                   deq=dict(solver="anderson", tol=1e-6, max_iter=100, on_fail="ignore"))
    trainer = Trainer(xl_config(tmp_path, model_options=options, log_path=None,
                                checkpoint_path=None))
    record = trainer.evaluate()
    assert record["tokens"] == 2 * 3 * T
    x, y = _rows(trainer.test_set.tokens, 2)
    trainer.model.eval()
    with torch.no_grad():
        whole = trainer.model.loss(x, y).item()
    assert abs(record["loss"] - whole) < 1e-4
    trainer.model.eval_mem_len = 0
    assert abs(trainer.evaluate()["loss"] - whole) > 1e-3


def test_a_run_with_memory_resumes_exactly(tmp_path):
    """Dropout and attention dropout in the block, interrupted after step 5 (the middle of a
    row: the memory of steps 4 and 5 must come back from the checkpoint)."""
    config = xl_config(tmp_path / "a", checkpoint_every=3)
    straight = Trainer(config)
    straight.fit(progress=False)
    config.update(log_path=str(tmp_path / "b.jsonl"), checkpoint_path=str(tmp_path / "b.pt"))
    resumed = interrupted_and_resumed(config, 5)
    assert_same_run(straight, resumed, config["log_path"])
    valid = lambda h: [r["loss"] for r in h if r["split"] == "test"]  # noqa: E731
    assert valid(resumed.history) == valid(straight.history)
    state = load_checkpoint(config["checkpoint_path"])["task"]
    z, u = state["memory"][0]
    assert z.shape == (4, 24, 16) and u.shape == (4, 24, 48)
    # without the saved memory the resumed run would differ: the checkpoint's memory matters
    config.update(log_path=str(tmp_path / "c.jsonl"), checkpoint_path=str(tmp_path / "c.pt"))
    with pytest.raises(KeyboardInterrupt):
        Trainer(config).fit(lambda r: (_ for _ in ()).throw(KeyboardInterrupt)
                            if r["split"] == "train" and r["step"] == 5 else None, progress=False)
    forgetful = Trainer.resume(config["checkpoint_path"])
    forgetful.task.memory["train"] = None
    forgetful.fit(progress=False)
    assert [r["loss"] for r in forgetful.history if r["split"] == "train"][5] != \
        [r["loss"] for r in straight.history if r["split"] == "train"][5]
