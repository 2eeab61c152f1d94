"""benchmarks/bench_race.py in CI: its --quick race (one seed to 85% on 300 test digits, about 10 s
of one CPU thread) finishes with both racers at the target, a finite wall-time ratio and the DEQ's
per-step breakdown, so the benchmark cannot rot unnoticed."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_race.py"


@pytest.fixture(scope="module")
def quick_run():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def row(stdout: str, racer: str) -> list:
    """The cells of the race table's row of `racer` (seed 0)."""
    lines = [line for line in stdout.splitlines() if line.startswith(f"| {racer} | 0 |")]
    assert len(lines) == 1, f"expected one row of {racer}, seed 0:\n{stdout}"
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def test_quick_race_runs(quick_run):
    assert quick_run.returncode == 0, quick_run.stderr[-3000:]


def test_both_racers_reach_the_target_and_the_deq_counts_its_solves(quick_run):
    deq, explicit = row(quick_run.stdout, "DEQ+JR"), row(quick_run.stdout, "explicit")
    for cells in (deq, explicit):
        assert cells[2] == "yes" and int(cells[3]) > 0 and float(cells[5]) > 0
        assert float(cells[-1].rstrip("%")) >= 85
    assert float(explicit[10]) == 1.0                      # one f-shaped layer per step
    # forward NFE + adjoint NFE + 1 + JR's 2 on every step (jac_reg_prob = 1)
    assert float(deq[11]) >= 1 and float(deq[12]) >= 1
    assert float(deq[10]) == pytest.approx(float(deq[11]) + float(deq[12]) + 3, abs=0.15)


def test_the_ratio_and_the_breakdown_are_printed(quick_run):
    out = quick_run.stdout
    match = re.search(r"wall time of the training steps to 85%: ([0-9.]+)× \(per seed: ", out)
    assert match and 0 < float(match.group(1)) < 100, out
    assert re.search(r"steps × median step time .*: [0-9.]+× \(per seed: ", out), out
    lines = [line for line in out.splitlines() if line.startswith("| 0 | ")]
    assert len(lines) == 1, out
    cells = lines[0].strip("|").split("|")[1:]
    step, fwd, bwd, jr, jr_all, rest, explicit = (float(c) for c in cells)
    assert 0 < fwd < step and 0 < bwd < step and 0 < jr and 0 < explicit
    assert rest == pytest.approx(step - fwd - bwd - jr_all, abs=0.02)


@pytest.mark.parametrize("argv", [["--target", "1.5"], ["--seeds", "0"], ["--eval-every", "0"],
                                  ["--preset", "cifar10_mdeq_tiny"], ["--deq-set", "no_such=1"]])
def test_bad_arguments_are_refused(argv):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_race
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with pytest.raises(SystemExit) as error:
        bench_race.parse_args(argv)
    assert error.value.code == 2
