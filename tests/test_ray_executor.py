"""The Ray executor on a real local Ray cluster (`ray.init(num_cpus=2)`): results equal the local executor's, the
shared P1 backbone travels to its dependants, a worker killed mid-run is retried, a run whose worker dies every time
stays pending, and the driver writes what workers send whole or not at all."""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmark.cli import main
from benchmark.grid import load_grid
from benchmark.runner import run_grid
from benchmark.store import DONE, PENDING, ResultsStore, pack_folder, read_json
from benchmark import ray_executor

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]   # one local Ray at a time: all in one worker
TASK_TITLE = "ray::exitbench.train_run"   # the process title Ray gives a worker while it runs the task


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def smoke_specs():
    """The smoke grid's three schedules (what the executor must get right; objectives are checked by bench check),
    at 4 epochs instead of 10: long enough for a worker to be killed mid-run, short for the suite."""
    return [replace(s, train={**s.train, "epochs": 4}) for s in load_grid("smoke").specs
            if s.regime in ("joint", "disjoint", "mixed")]


def train(specs, root: Path, executor: str, **kwargs):
    return run_grid(specs, ResultsStore(root), grid_name="smoke", executor=executor, data_root=Path("/nonexistent"),
                    device="cpu", **kwargs)


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])     # after "pid (comm) state": the parent's pid


def ours(pid: int) -> bool:
    """Whether the process descends from this test process (its Ray's raylet starts the workers), not from another
    test session's Ray on the same machine."""
    while pid > 1:
        pid = parent_pid(pid)
        if pid == os.getpid():
            return True
    return False


def task_processes() -> list[int]:
    """Pids of this cluster's Ray workers running a training task right now (the title is set while the task runs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(TASK_TITLE.encode()) and ours(int(entry.name)):
                    pids.append(int(entry.name))
            except (OSError, ValueError):
                continue
    return pids


class Killer(threading.Thread):
    """Kills (SIGKILL) workers running a training task, `times` times, each once it has run `after` seconds."""

    def __init__(self, times: int, after: float):
        super().__init__(daemon=True)
        self.times, self.after, self.killed, self.stop = times, after, [], threading.Event()

    def run(self):
        seen: dict[int, float] = {}
        while not self.stop.is_set() and len(self.killed) < self.times:
            now = time.monotonic()
            for pid in task_processes():
                seen.setdefault(pid, now)
                if pid not in self.killed and now - seen[pid] >= self.after:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                    break
            time.sleep(0.05)


def pretrained_disjoint(folder: Path):
    """The smoke grid's disjoint run started from a [model] weights file saved here (benchmark/weights.py)."""
    import torch

    from benchmark.models import build_model
    from benchmark.store import file_digest
    (spec,) = [s for s in smoke_specs() if s.regime == "disjoint"]
    torch.manual_seed(3)
    network = build_model("small_cnn", 10, (1, 8, 8), head=spec.model["head"], exits=spec.model["exits"])
    torch.save(network.state_dict(), folder / "weights.pt")
    digest = "sha256:" + file_digest(folder / "weights.pt")
    return replace(spec, model={**spec.model, "weights": digest}), {digest: folder / "weights.pt"}


def test_ray_runs_equal_local_runs_and_share_one_backbone(cluster, tmp_path):
    """Also a run started from pretrained weights: the staged copy travels to the worker's private store."""
    from benchmark.weights import stage
    pretrained, weights = pretrained_disjoint(tmp_path)
    specs = [*smoke_specs(), pretrained]
    for executor in ("local", "ray"):
        stage(tmp_path / executor, weights)
    local = train(specs, tmp_path / "local", "local", threads=1)
    remote = train(specs, tmp_path / "ray", "ray", cpus_per_run=1)
    assert sorted(remote.done) == sorted(local.done) == sorted(s.run_id for s in specs)
    assert read_json(tmp_path / "ray" / "runs" / pretrained.run_id / "metrics.json")["pretrained"] == {
        "weights": pretrained.model["weights"], "classifier_loaded": True}
    for spec in specs:        # same thread count: bitwise the same logits and numbers
        a = read_json(tmp_path / "local" / "runs" / spec.run_id / "metrics.json")
        b = read_json(tmp_path / "ray" / "runs" / spec.run_id / "metrics.json")
        assert a["files"]["logits.npz"] == b["files"]["logits.npz"]
        assert a["summary"] == b["summary"]
        assert b["environment"]["threads"] == 1
    backbones = list((tmp_path / "ray" / "backbones").iterdir())
    assert len(backbones) == 1                              # disjoint and mixed share one P1
    store = ResultsStore(tmp_path / "ray")
    assert store.backbone_inspect(backbones[0].name) == (True, None)
    reused = {s.regime: read_json(store.run_dir(s.run_id) / "metrics.json")["cost"]["p1_reused"]
              for s in specs if s.regime != "joint" and s is not pretrained}
    assert sorted(reused.values()) == [False, True]          # one run trained it, the other received it
    trained_by = read_json(backbones[0] / "cost.json")["trained_by"]
    assert reused[next(s.regime for s in specs if s.run_id == trained_by)] is False
    assert not list((tmp_path / "ray").glob(".*.tmp"))       # no staging folder left behind


def test_a_worker_killed_mid_run_is_retried_and_nothing_is_lost(cluster, tmp_path):
    killer = Killer(times=1, after=0.5)
    killer.start()
    try:
        outcome = train(smoke_specs(), tmp_path, "ray", cpus_per_run=1)
    finally:
        killer.stop.set()
        killer.join()
    assert len(killer.killed) == 1, "no training task was seen running long enough to be killed"
    assert not outcome.lost and not outcome.failed
    store = ResultsStore(tmp_path)
    assert [store.state(s.run_id) for s in smoke_specs()] == [DONE] * 3


def test_a_run_whose_worker_dies_every_time_stays_pending_and_the_next_run_finishes_it(cluster, tmp_path,
                                                                                      monkeypatch):
    """With one retry instead of MAX_RETRIES: the same path, and two workers killed instead of four (each one a
    new Ray worker importing torch: seconds of this suite's time)."""
    monkeypatch.setattr(ray_executor, "MAX_RETRIES", 1)
    joint = [s for s in smoke_specs() if s.regime == "joint"]
    killer = Killer(times=ray_executor.MAX_RETRIES + 1, after=0.2)
    killer.start()
    try:
        outcome = train(joint, tmp_path, "ray", cpus_per_run=1)
    finally:
        killer.stop.set()
        killer.join()
    assert len(killer.killed) == ray_executor.MAX_RETRIES + 1
    assert list(outcome.lost) == [joint[0].run_id] and not outcome.failed and not outcome.done
    store = ResultsStore(tmp_path)
    assert store.state(joint[0].run_id) == PENDING
    again = train(joint, tmp_path, "ray", cpus_per_run=1)
    assert again.done == [joint[0].run_id] and store.state(joint[0].run_id) == DONE


def test_the_cli_refuses_gpus_the_cluster_does_not_have(cluster, tmp_path):
    result = CliRunner().invoke(main, ["run", "--grid", "smoke", "--results", str(tmp_path), "--executor", "ray",
                                       "--gpus-per-run", "1"])
    assert result.exit_code == 2
    assert "asks for 1 GPUs but the Ray cluster has 0" in result.output
    assert not (tmp_path / "runs").exists()


def test_receive_replaces_an_earlier_attempt_whole_and_refuses_paths(tmp_path):
    store = ResultsStore(tmp_path)
    folder = store.run_dir("abc")
    folder.mkdir(parents=True)
    (folder / "error.json").write_text("{}")                 # an earlier, failed attempt
    source = tmp_path / "elsewhere"
    source.mkdir()
    (source / "spec.json").write_text('{"x": 1}')
    (source / ".lock").write_text("")                        # never travels
    with store.lock():
        store.receive(folder, pack_folder(source))
        assert sorted(p.name for p in folder.iterdir()) == ["spec.json"]
        with pytest.raises(ValueError, match="refusing to unpack"):
            store.receive(store.run_dir("evil"), {"../escape.json": b"{}"})
    assert not store.run_dir("evil").exists() and not (tmp_path / "runs" / "escape.json").exists()
    assert not list(tmp_path.glob(".incoming.*"))


def test_sigterm_takes_benchs_path_and_stops_the_local_ray_it_started(tmp_path):
    """ray.init replaces bench's SIGTERM handler (Ray's C++ dump, exit 1, no resume hint); bench restores it, so a
    SIGTERM exits 143 with the resume line of the other executors, prints no ANSI colour codes, and leaves none of
    the local Ray's processes (raylet, GCS, dashboard and runtime-env agents) running."""
    import subprocess
    import tempfile
    from conftest import BENCH, REPO, write_grid
    grid = write_grid(tmp_path / "grid.toml", regimes=("joint", "mixed"), seeds=(0, 1), epochs=40)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")          # short: Ray's socket paths must fit 107 bytes
    process = subprocess.Popen([*BENCH, "run", "--grid", str(grid), "--results", str(out), "--executor", "ray"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               env={**os.environ, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"})

    def session() -> list[str]:
        """Every live process of bench's session (it leads one: start_new_session): Ray's raylet, GCS, dashboard
        and runtime-env agents and workers all stay in it."""
        listing = subprocess.run(["ps", "-eo", "sid=,pid=,stat=,args="], capture_output=True, text=True).stdout
        return [line for line in listing.splitlines()
                if line.split()[0] == str(process.pid) and line.split()[1] != str(process.pid)
                and not line.split()[2].startswith("Z")]

    deadline = time.time() + 240
    while not any(TASK_TITLE in line for line in session()):
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no run started training"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, (process.returncode, stderr)
    assert "terminated (SIGTERM): rerun the same command" in stderr, stderr
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr
    assert "\x1b[" not in stdout + stderr
    assert not any(out.glob("runs/*/error.json")), "an interrupted run is pending, not failed"
    deadline = time.time() + 30
    while session() and time.time() < deadline:
        time.sleep(0.5)
    assert not session(), f"Ray processes left running: {session()}"
