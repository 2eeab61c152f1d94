"""One training loop for every task: data, optimizer and schedule, progress bar, metrics, a JSONL
log, atomic checkpoints and exact resume.

Each step minimises the cross-entropy of the model on a batch. For a DEQ model the loop also
records the solver's effort: forward NFE (solving z* = f(z*, x)), backward NFE (solving the adjoint
g = Jᵀ g + ∂ℓ/∂z*) and the final relative residual. A warm-up of ``pretrain_steps`` steps trains
the cell unrolled ``pretrain_depth`` times (as the DEQ papers do) before the equilibrium solve.

Jacobian regularization (Bai, Koltun, Kolter 2021): with ``jac_reg_weight = γ > 0`` the loss of a
step becomes  cross-entropy + γ_t · ‖J_f(z*)‖²_F / d  (Hutchinson, ``jac_reg_probes`` probes),
applied on each step with probability ``jac_reg_prob``, with γ_t rising linearly from 0 to γ over
the first ``jac_reg_ramp_steps`` steps (0: γ from the start). Train records log ``jac_weight``
(γ_t) and ``jac_loss`` (the estimate, when applied); test records log the Jacobian's spectral
radius ρ(J) and ‖J‖²_F / d at z* on the first ``eval_jacobian_samples`` test examples.

Determinism: the model is initialised from ``seed`` and epoch e visits the data in the order of
``randperm(seed, e)``, so a run resumed from a checkpoint (model, optimizer, schedule, step and RNG
state) ends exactly where the uninterrupted run ends.

Headless:  python -m deqlite.train --config mnist [--set epochs=3] [--log runs/mnist.jsonl]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._validate import check_range, did_you_mean, lookup
from .data import load_dataset
from .diagnostics import equilibrium
from .jacobian import hutchinson_frobenius, spectral_radius
from .models import build_model

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Everything a run needs; presets in ``deqlite/configs`` fill it in."""
    dataset: str = "mnist5k"
    data_root: Optional[str] = None
    download: bool = False
    limit_train: Optional[int] = None      # use only the first N training examples (quick runs)
    limit_test: Optional[int] = None
    model: str = "deq_classifier"
    model_options: dict = field(default_factory=dict)
    epochs: int = 5
    max_steps: Optional[int] = None        # stop early after this many steps in all
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    pretrain_steps: int = 0                # warm-up steps with the cell unrolled ...
    pretrain_depth: int = 6                # ... this many times
    jac_reg_weight: float = 0.0            # γ of the Jacobian regularizer (0: off)
    jac_reg_prob: float = 1.0              # apply it on a step with this probability
    jac_reg_probes: int = 1                # Hutchinson probes per step
    jac_reg_ramp_steps: int = 0            # γ rises linearly from 0 over these steps (0: constant)
    eval_jacobian_samples: int = 100       # test examples for ρ(J), ‖J‖²_F/d at evaluation (0: skip)
    seed: int = 0
    device: str = "auto"                   # "auto": cuda when available
    log_path: Optional[str] = None         # JSONL, one record per step / evaluation
    checkpoint_path: Optional[str] = None
    checkpoint_every: int = 0              # steps; 0: at the end of every epoch

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build a config; an unknown key is an error that names the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in valid:
                raise KeyError(f"unknown config key {key!r}.{did_you_mean(key, valid)} "
                               f"Valid keys: {', '.join(valid)}.")
        return cls(**values)

    def __post_init__(self):
        lookup(OPTIMIZERS, self.optimizer, "optimizer")
        lookup(SCHEDULES, self.schedule, "schedule")
        for name in ("epochs", "batch_size"):
            check_range(getattr(self, name), name, low=1, integer=True)
        for name in ("pretrain_steps", "pretrain_depth", "checkpoint_every", "seed",
                     "jac_reg_ramp_steps", "eval_jacobian_samples"):
            check_range(getattr(self, name), name, low=0, integer=True)
        check_range(self.lr, "lr", low=0, low_open=True)
        check_range(self.jac_reg_weight, "jac_reg_weight", low=0)
        check_range(self.jac_reg_prob, "jac_reg_prob", low=0, high=1)
        check_range(self.jac_reg_probes, "jac_reg_probes", low=1, integer=True)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside `path`, then rename it over `path`: an interrupted
    write leaves the previous checkpoint intact (os.replace is atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL log; a half-written last line (a run still writing) is skipped."""
    records = []
    with open(path) as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class Trainer:
    """Holds a model, its data and optimizer, and trains it with ``fit()``.

    ``fit()`` can be interrupted (Ctrl-C / the notebook's stop button) and called again: it goes on
    from the step it reached, after saving a checkpoint if ``checkpoint_path`` is set.
    """

    def __init__(self, config: TrainConfig | dict):
        self.config = c = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        torch.manual_seed(c.seed)
        self.device = torch.device("cuda" if c.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if c.device == "auto" else c.device))
        self.train_set = self._load("train", c.limit_train)
        self.test_set = self._load("test", c.limit_test)
        x0 = self.train_set.tensors[0]
        options = dict(in_channels=x0.shape[1], image_size=x0.shape[-1], **c.model_options)
        self.model = build_model(c.model, **options).to(self.device)
        opt_cls = lookup(OPTIMIZERS, c.optimizer, "optimizer")
        self.optimizer = opt_cls(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.train_set) / c.batch_size)
        self.total_steps = min(c.max_steps or math.inf, c.epochs * self.steps_per_epoch)
        decay = (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, self.total_steps) / self.total_steps))
                 if c.schedule == "cosine" else (lambda s: 1.0))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, decay)
        self.step = 0
        self.history: list[dict] = []

    def _load(self, split, limit):
        c = self.config
        ds = load_dataset(c.dataset, split, root=c.data_root, download=c.download)
        if limit is not None:
            ds = torch.utils.data.TensorDataset(*(t[:limit] for t in ds.tensors))
        return ds

    @property
    def deq(self):
        """The model's DEQ, or None for an explicit model."""
        return getattr(self.model, "deq", None)

    def _batch(self, step: int):
        epoch, i = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train_set),
                               generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
        idx = order[i * self.config.batch_size:(i + 1) * self.config.batch_size]
        x, y = (t[idx].to(self.device) for t in self.train_set.tensors)
        return epoch, x, y

    def _solver_metrics(self) -> dict:
        deq = self.deq
        if deq is None or deq.forward_stats is None:
            return dict(fwd_nfe=deq.pretrain_steps if deq is not None else None,
                        bwd_nfe=None, residual=None)
        bwd = deq.backward_stats
        return dict(fwd_nfe=deq.forward_stats.nfe, bwd_nfe=bwd.nfe if bwd is not None else None,
                    residual=deq.forward_stats.final_rel.max().item())

    def _set_warm_up(self) -> bool:
        """Unroll the cell (warm-up) during the first ``pretrain_steps`` steps, solve after."""
        warm_up = self.step < self.config.pretrain_steps
        if self.deq is not None:
            self.deq.pretrain_steps = self.config.pretrain_depth if warm_up else 0
        return warm_up

    def jac_weight(self, step: int) -> float:
        """γ_t: the Jacobian regularizer's weight at `step` (linear ramp, then constant)."""
        c = self.config
        ramp = min(1.0, (step + 1) / c.jac_reg_ramp_steps) if c.jac_reg_ramp_steps else 1.0
        return c.jac_reg_weight * ramp

    def _jac_reg_now(self) -> bool:
        """Whether this step adds the regularizer: a draw with probability ``jac_reg_prob`` from a
        generator seeded by (seed, step), so a resumed run makes the same draws."""
        c = self.config
        if self.deq is None or c.jac_reg_weight == 0:
            return False
        draw = torch.rand(1, generator=torch.Generator().manual_seed(c.seed * 7919 + self.step))
        return draw.item() < c.jac_reg_prob

    def train_step(self) -> dict:
        """One optimizer step on the next batch; returns its metrics record."""
        c = self.config
        epoch, x, y = self._batch(self.step)
        pretrain = self._set_warm_up()
        gamma, regularize = self.jac_weight(self.step), self._jac_reg_now()
        start = time.perf_counter()
        self.model.train()
        if self.deq is not None:
            self.deq.jac_probes = c.jac_reg_probes if regularize else 0
        try:
            logits = self.model(x)
        finally:
            if self.deq is not None:
                self.deq.jac_probes = 0
        loss = F.cross_entropy(logits, y)
        jac_loss = self.deq.jac_loss if regularize else None
        total = loss + gamma * jac_loss if jac_loss is not None else loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        elapsed = time.perf_counter() - start
        return dict(split="train", step=self.step, epoch=epoch, loss=loss.item(),
                    acc=(logits.argmax(1) == y).float().mean().item(), lr=lr, pretrain=pretrain,
                    samples_per_s=len(y) / elapsed, jac_weight=gamma if c.jac_reg_weight else None,
                    jac_loss=jac_loss.item() if jac_loss is not None else None,
                    **self._solver_metrics())

    @torch.no_grad()
    def evaluate(self, batch_size: int = 500) -> dict:
        """Loss and accuracy on the test split (mean forward NFE for a DEQ)."""
        self.model.eval()
        self._set_warm_up()
        x_all, y_all = self.test_set.tensors
        loss = correct = 0.0
        nfe, residual = [], []
        for i in range(0, len(y_all), batch_size):
            x, y = x_all[i:i + batch_size].to(self.device), y_all[i:i + batch_size].to(self.device)
            logits = self.model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            m = self._solver_metrics()
            nfe.append(m["fwd_nfe"])
            residual.append(m["residual"])
        n = len(y_all)
        mean_nfe = sum(nfe) / len(nfe) if None not in nfe else None
        return dict(split="test", step=self.step, epoch=(self.step - 1) // self.steps_per_epoch,
                    loss=loss / n, acc=correct / n, fwd_nfe=mean_nfe,
                    residual=max(residual) if None not in residual else None,
                    **self._jacobian_metrics())

    def _jacobian_metrics(self) -> dict:
        """ρ(J) (mean and max) and ‖J‖²_F / d at the DEQ's state on the first test examples, with
        fixed random draws so that successive evaluations are comparable."""
        n = self.config.eval_jacobian_samples
        if self.deq is None or n == 0:
            return {}
        x = self.test_set.tensors[0][:n].to(self.device)
        _, f, z = equilibrium(self.model, x)
        rho = spectral_radius(f, z, generator=torch.Generator().manual_seed(0))
        z_in = z.detach().requires_grad_()
        with torch.enable_grad():
            fro = hutchinson_frobenius(f(z_in), z_in, n_probes=4, kind="rademacher",
                                       generator=torch.Generator().manual_seed(1))
        return dict(spectral_radius=rho.mean().item(), spectral_radius_max=rho.max().item(),
                    jac_frobenius=fro.mean().item())

    def _record(self, record: dict, callback) -> None:
        record["time"] = time.time()
        self.history.append(record)
        if self.config.log_path:
            Path(self.config.log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.config.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        if callback is not None:
            callback(record)

    def fit(self, callback: Optional[Callable[[dict], None]] = None, *, progress: bool = True) -> list[dict]:
        """Train until ``total_steps``; `callback(record)` sees every train and test record (a live
        dashboard's ``log``). Returns the history of records."""
        c = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not progress,
                   desc=f"{c.model} on {c.dataset}", unit="step")
        try:
            while self.step < self.total_steps:
                rec = self.train_step()
                self._record(rec, callback)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.2f}",
                                nfe=rec["fwd_nfe"], refresh=False)
                end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                if end_of_epoch:
                    self._record(self.evaluate(), callback)
                every = c.checkpoint_every or self.steps_per_epoch
                if c.checkpoint_path and (self.step % every == 0 or self.step == self.total_steps):
                    self.save_checkpoint()
        except KeyboardInterrupt:
            if c.checkpoint_path:
                self.save_checkpoint()
            print(f"Interrupted at step {self.step}/{self.total_steps}"
                  + (f"; checkpoint saved to {c.checkpoint_path}" if c.checkpoint_path else "")
                  + ". Call fit() again to continue.")
            raise
        finally:
            bar.close()
        if c.log_path:
            with open(c.log_path, "a") as fh:
                fh.write(json.dumps({"event": "done", "step": self.step, "time": time.time()}) + "\n")
        return self.history

    def save_checkpoint(self, path: Optional[str] = None) -> None:
        path = path or self.config.checkpoint_path
        if not path:
            raise ValueError("no checkpoint path: set config.checkpoint_path or pass path=...")
        atomic_save(dict(config=dataclasses.asdict(self.config), step=self.step,
                         model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(), rng=torch.get_rng_state(),
                         history=self.history), path)

    @classmethod
    def resume(cls, path: str, **overrides) -> "Trainer":
        """A trainer restored from a checkpoint, ready to ``fit()`` on from where it stopped. The
        JSONL log is cut back to that step, so records after the checkpoint are not duplicated."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        trainer = cls(TrainConfig.from_dict({**state["config"], **overrides}))
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        trainer.step, trainer.history = state["step"], state["history"]
        log = trainer.config.log_path
        if log and Path(log).exists():
            kept = [r for r in read_log(log) if r.get("step", 0) <= trainer.step and "event" not in r]
            Path(log).write_text("".join(json.dumps(r) + "\n" for r in kept))
        return trainer


def _parse_set(items: list[str]) -> dict:
    """``["epochs=3", "model_options.hidden=64"]`` → nested dict; values parsed as JSON if they can be."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return merged


def main(argv=None) -> None:
    from .configs import PRESETS, load_preset
    parser = argparse.ArgumentParser(prog="python -m deqlite.train", description="Train a preset.")
    parser.add_argument("--config", required=True, help=f"preset name: {', '.join(PRESETS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set epochs=2 --set model_options.hidden=64")
    parser.add_argument("--log", help="JSONL log path (default runs/CONFIG.jsonl)")
    parser.add_argument("--checkpoint", help="checkpoint path (default runs/CONFIG.pt)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    args = parser.parse_args(argv)
    config = _merge(load_preset(args.config), _parse_set(args.set))
    config.setdefault("log_path", args.log or f"runs/{args.config}.jsonl")
    config.setdefault("checkpoint_path", args.checkpoint or f"runs/{args.config}.pt")
    if args.log:
        config["log_path"] = args.log
    if args.checkpoint:
        config["checkpoint_path"] = args.checkpoint
    if args.resume and Path(config["checkpoint_path"]).exists():
        trainer = Trainer.resume(config["checkpoint_path"], log_path=config["log_path"],
                                 checkpoint_path=config["checkpoint_path"])
    else:
        if config.get("log_path") and Path(config["log_path"]).exists():
            Path(config["log_path"]).unlink()
        trainer = Trainer(config)
    start = time.perf_counter()
    trainer.fit()
    final = [r for r in trainer.history if r["split"] == "test"][-1]
    print(f"test accuracy {final['acc']:.4f}, test loss {final['loss']:.4f}, "
          f"forward NFE {final['fwd_nfe']}, {time.perf_counter() - start:.1f} s "
          f"(log: {config['log_path']}, checkpoint: {config['checkpoint_path']})")


if __name__ == "__main__":
    main()
