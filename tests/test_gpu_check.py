"""benchmarks/gpu_check.py in CI: its --device cpu --quick run passes and covers every preset, so the
GPU check cannot rot before a GPU is lent (about 15 s of one CPU thread)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deqlite.train.configs import PRESETS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def quick_run():
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=180)


def test_quick_cpu_run_passes(quick_run):
    failed = [line for line in quick_run.stdout.splitlines() if ": FAIL (" in line]
    assert quick_run.returncode == 0, "\n".join(failed) + "\n" + quick_run.stderr[-3000:]


def test_quick_cpu_run_has_a_row_for_every_preset_and_says_what_it_skipped(quick_run):
    rows = [line for line in quick_run.stdout.splitlines() if line.startswith("| ")]
    missing = [name for name in PRESETS if not any(row.startswith(f"| {name} |") for row in rows)]
    assert not missing, f"presets without a row in gpu_check's output: {missing}"
    assert "skipped: needs CUDA" in quick_run.stdout            # never silently


def test_a_preset_that_cannot_build_is_a_failed_row(monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(SCRIPT.parent))
    real = gpu_check.load_preset

    def broken(name, overrides=()):
        config = real(name, overrides)
        config["model_options"]["no_such_option"] = 1           # the model refuses it
        return config

    monkeypatch.setattr(gpu_check, "load_preset", broken)
    monkeypatch.setattr(gpu_check, "PRESETS", ["mnist"])
    monkeypatch.setattr(gpu_check, "QUICK", True)
    report = gpu_check.Report()
    gpu_check.section_presets(report)
    (row,) = report.rows
    assert row["name"] == "mnist" and row["status"] == "FAIL" and "no_such_option" in row["detail"]
    assert "| mnist |" in report.markdown("") and report.failed == [row]
