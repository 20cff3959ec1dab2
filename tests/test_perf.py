"""`bench perf` runs its three loops on real data and prints each one's throughput; its objective table prints each
objective's arithmetic minimum per step beside the measured cost."""
import re

import pytest
import torch
from click.testing import CliRunner

from benchmark.cli import main
from benchmark.models.multi_exit import MultiExitNet
from benchmark.perf import minimum_step_costs, pass_flops
from conftest import bench_subprocess
from regimes.registry import build_regime


@pytest.mark.slow
def test_perf_script_times_the_plain_loop_the_in_memory_loop_and_the_trainer():
    result = bench_subprocess("perf", "--dataset", "digits", "--epochs", "1", "--repeats", "1", "--threads", "1",
                              "--workers", "1")          # a fresh process: its threads and DataLoader workers
    assert result.returncode == 0, result.stderr
    rates = {name: float(rate) for name, rate in
             re.findall(r"^\s+(plain DataLoader loop|in-memory loop|exitbench trainer)\s*:.*?(\d+) images/s",
                        result.stdout, flags=re.M)}
    assert set(rates) == {"plain DataLoader loop", "in-memory loop", "exitbench trainer"}
    assert all(rate > 0 for rate in rates.values())
    assert re.search(r"\d\.\d\dx the plain loop, overhead [+-]\d+\.\d %", result.stdout)


def test_objective_costs_of_named_objectives_are_relative_to_uniform():
    result = CliRunner().invoke(main, ["perf", "--dataset", "digits", "--epochs", "1", "--repeats", "1", "--threads",
                                       "1", "--objectives", "boosted", "pcgrad"])
    assert result.exit_code == 0, result.output
    rows = dict(re.findall(r"^\s+(\w+)\s+P2\s+[\d.]+ ms\s+x([\d.]+)", result.stdout, flags=re.M))
    assert set(rows) == {"uniform", "boosted", "pcgrad"}
    assert rows["uniform"] == "1.00"
    minimum = {name: (float(low), float(quotient)) for name, low, quotient in
               re.findall(r"^\s+(\w+)\s+P2 .*minimum x([\d.]+)\s+measured/minimum ([\d.]+)", result.stdout,
                          flags=re.M)}
    assert minimum["uniform"] == (1.0, 1.0) and minimum["boosted"][0] == 1.0
    assert minimum["pcgrad"][0] > 1.5                           # a forward and K backwards, most of them partial
    assert minimum["pcgrad"][1] == pytest.approx(float(rows["pcgrad"]) / minimum["pcgrad"][0], abs=0.01)
    assert re.search(r"^\s+pcgrad\s+P2 .*\(no P3\)", result.stdout, flags=re.M)      # refused under disjoint


def assert_one_error_line(result, *fragments):
    """A user mistake: exit code 2, one `error: ...` line on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert "Traceback" not in result.output and not result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_perf_names_an_unknown_objective_and_the_registered_ones():
    result = CliRunner().invoke(main, ["perf", "--objectives", "pcgard"])
    assert_one_error_line(result, "unknown objective(s) pcgard", "pcgrad")


def test_perf_objective_names_without_objectives_and_an_unknown_dataset_are_one_line_each():
    assert_one_error_line(CliRunner().invoke(main, ["perf", "pcgrad"]), "--objectives pcgrad")
    assert_one_error_line(CliRunner().invoke(main, ["perf", "--dataset", "cifar11"]), "unknown dataset 'cifar11'",
                          "digits")


def test_minimum_step_costs_of_a_linear_network_are_counted_by_hand():
    """Three linear blocks of width d, heads after blocks 0 and 1 and the classifier, linear to c classes. Per sample
    (2 FLOPs per multiply-add): a forward costs 2d² per block and 2dc per head; a backward twice that (input and
    weight gradients), except block 0, whose input needs none (2d²), and the heads' weight gradients where only the
    blocks' are asked for. So F = 6d² + 6dc and B = 10d² + 12dc: uniform F + B; exits' own backwards 2d² + 4dc,
    6d² + 4dc, 10d² + 4dc."""
    d, c = 10, 5
    net = MultiExitNet([torch.nn.Linear(d, d) for _ in range(3)], torch.nn.Linear(d, c),
                       [torch.nn.Linear(d, c) for _ in range(2)], [0, 1])
    D, C = d * d, d * c
    assert pass_flops(net, (d,), build_regime("joint").objective) == {
        "forward": 6 * D + 6 * C, "backward": 10 * D + 12 * C,
        "exit_backward": [2 * D + 4 * C, 6 * D + 4 * C, 10 * D + 4 * C], "blocks_backward": 10 * D + 6 * C}
    uniform = 16 * D + 18 * C
    expected = {
        "uniform": 1.0, "sdn": 1.0, "distill": 1.0, "ge": 1.0,
        "cet": 2.0,                                                       # two forwards, a backward through both
        "bdl": (14 * D + 18 * C) / uniform,        # 2 groups: block 2's input detached, no input gradient there
        "pcgrad": (24 * D + 18 * C) / uniform,                              # F + the three exits' own backwards
        "nash": (24 * D + 18 * C) / uniform,
        "metagf": (40 * D + 30 * C) / uniform,          # + the look-ahead forward + the backward to the blocks
        "l2w": (58 * D + 66 * C) / uniform,                                 # 3 F + 4 B per meta step
    }
    costs = minimum_step_costs(net, (d,), c, list(expected))
    assert costs["uniform"] == 1.0
    assert costs == pytest.approx(expected, rel=1e-12)
