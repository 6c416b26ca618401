"""``benchmarks/gpu_check.py``, the GPU path's one-run check: without a CUDA device it says so and runs
nothing (exit 0); on the CPU (``--accelerator cpu``) the whole script runs, every GPU-vs-CPU row agreeing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run")
def test_without_a_device_it_says_so():
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device on this machine; nothing was run" in proc.stdout


@pytest.mark.slow
def test_the_script_runs_on_the_cpu():
    proc = subprocess.run([sys.executable, SCRIPT, "--accelerator", "cpu", "--models", "cnn", "--solvers", "exact",
                           "ekfac", "--epochs", "3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| cnn |")]
    assert len(rows) == 2 and all("1.0000" in row for row in rows), proc.stdout
