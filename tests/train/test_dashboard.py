"""The live figures of training runs (deqlite.train.dashboard): the dashboard draws every record
of a log, RunComparison one line per run and metric, follow reads a log another process writes."""
import json

import pytest

from deqlite.train.dashboard import RunComparison, TrainingDashboard, follow
def test_dashboard_and_follow_draw_the_log(tmp_path):
    records = [dict(split="train", step=s, loss=1 / s, acc=0.5, fwd_nfe=10, bwd_nfe=8,
                    residual=1e-4, jac_loss=0.1 if s % 2 else None) for s in range(1, 6)]
    records.append(dict(split="test", step=5, loss=0.3, acc=0.9, fwd_nfe=9, residual=1e-4,
                        spectral_radius=0.5, spectral_radius_max=0.8, jac_frobenius=0.1))
    dash = TrainingDashboard()
    for r in records:
        dash.log(r)
    assert dash.points("loss", "train", "loss") == 5 and dash.points("loss", "test", "loss") == 1
    assert dash.points("nfe", "train", "bwd_nfe") == 5
    assert dash.axes["residual"].get_yscale() == "log"
    assert dash.axes["nfe"].get_ylabel() == "function evaluations"
    assert dash.points("jac", "train", "jac_loss") == 3               # only the regularized steps
    assert dash.points("rho", "test", "spectral_radius_max") == 1
    legend = lambda panel: [t.get_text() for t in dash.axes[panel].get_legend().get_texts()]  # noqa: E731
    assert legend("jac") == ["train (JR estimate)", "test"]
    unregularized = TrainingDashboard()
    for r in records:
        unregularized.log({k: v for k, v in r.items() if k != "jac_loss"})
    assert [t.get_text() for t in unregularized.axes["jac"].get_legend().get_texts()] == ["test"]

    path = tmp_path / "remote.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"event": "done"}\n{"spli')
    followed = follow(path, poll=0.01, timeout=5)
    assert followed.points("acc", "train", "acc") == 5 and followed.points("acc", "test", "acc") == 1
    partial = tmp_path / "running.jsonl"
    partial.write_text(json.dumps(records[0]) + "\n")
    assert follow(partial, poll=0.01, timeout=0.05).points("loss", "train", "loss") == 1


def test_run_comparison_draws_one_line_per_run_and_metric():
    compare = RunComparison(["plain", "JR"], {"fwd_nfe": "NFE", "acc": "accuracy"}, min_interval=0)
    for label, nfe in [("plain", 16), ("JR", 9)]:
        for run in (0, 1):
            log = compare.callback(label, run=run)
            for step in (10, 20, 30):
                log(dict(split="train", step=step, fwd_nfe=99, acc=0.1))     # not the test split
                log(dict(split="test", step=step, fwd_nfe=nfe + run, acc=0.9))
    assert len(compare.lines) == 2 * 2 * 2
    line = compare.lines["JR", 1, "fwd_nfe"]
    assert list(line.get_xdata()) == [10, 20, 30] and list(line.get_ydata()) == [10, 10, 10]
    assert line.get_color() == compare.lines["JR", 0, "acc"].get_color() != \
        compare.lines["plain", 0, "acc"].get_color()
    with pytest.raises(KeyError, match="no run label 'jr'"):
        compare.callback("jr")
    with pytest.raises(ValueError, match="panels is empty"):
        RunComparison(["a"], {})


def test_follow_continues_without_redrawing_and_stops_when_the_run_exits(tmp_path):
    import json
    import subprocess
    import sys
    import time
    log = tmp_path / "run.jsonl"
    log.write_text("".join(json.dumps(dict(split="train", step=s, loss=1.0 / s)) + "\n"
                           for s in (1, 2)))
    dash = follow(log, poll=0.01, timeout=0.05)
    with open(log, "a") as fh:
        fh.write(json.dumps(dict(split="train", step=3, loss=0.3)) + "\n")
    dash = follow(log, poll=0.01, timeout=0.05, dashboard=dash)
    assert dash.points("loss", "train", "loss") == 3            # 1, 2, 3: nothing drawn twice
    run = subprocess.Popen([sys.executable, "-c", "pass"])       # a run that dies, no "done"
    start = time.perf_counter()
    follow(log, poll=0.05, timeout=60, process=run)
    assert time.perf_counter() - start < 30
