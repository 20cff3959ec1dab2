"""The performance script runs its three loops on real data and prints each one's throughput."""
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_perf_script_times_the_plain_loop_the_in_memory_loop_and_the_trainer():
    result = subprocess.run([sys.executable, "-m", "benchmark.perf", "--dataset", "digits", "--epochs", "1",
                             "--repeats", "1", "--threads", "1", "--workers", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rates = {name: float(rate) for name, rate in
             re.findall(r"^\s+(plain DataLoader loop|in-memory loop|exitbench trainer)\s*:.*?(\d+) images/s",
                        result.stdout, flags=re.M)}
    assert set(rates) == {"plain DataLoader loop", "in-memory loop", "exitbench trainer"}
    assert all(rate > 0 for rate in rates.values())
    assert re.search(r"\d\.\d\dx the plain loop, overhead [+-]\d+\.\d %", result.stdout)


def test_objective_costs_of_named_objectives_are_relative_to_uniform():
    result = subprocess.run([sys.executable, "-m", "benchmark.perf", "--dataset", "digits", "--epochs", "1",
                             "--repeats", "1", "--threads", "1", "--objectives", "boosted", "pcgrad"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = dict(re.findall(r"^\s+(\w+)\s+P2\s+[\d.]+ ms\s+x([\d.]+)", result.stdout, flags=re.M))
    assert set(rows) == {"uniform", "boosted", "pcgrad"}
    assert rows["uniform"] == "1.00"
    assert re.search(r"^\s+pcgrad\s+P2 .*\(no P3\)", result.stdout, flags=re.M)      # refused under disjoint


def test_perf_names_an_unknown_objective_and_the_registered_ones():
    result = subprocess.run([sys.executable, "-m", "benchmark.perf", "--objectives", "pcgard"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown objective(s) pcgard" in result.stderr and "pcgrad" in result.stderr
