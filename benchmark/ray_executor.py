"""The Ray executor: every run is a Ray task with declared resources, on one machine or a cluster.

Workers need no shared filesystem. A task trains its run into a private temporary store on its node and returns
the run folder's files (and, if it trained one, the shared P1 backbone's); the driver writes them into the results
folder, whole or not at all (`ResultsStore.receive`), and checks them against their checksums. A run that needs a
shared backbone gets it as an argument: the backbone already stored, or the object the run training it returns, so
Ray starts those dependants only once their backbone exists, while every other run starts at once.

A task whose worker process dies is retried by Ray (`MAX_RETRIES`); a run that still does not come back stays
pending, as after a kill of `bench run`. Nothing a run finished is lost: the driver stores each result as it arrives.
Every node needs exitbench installed and the grid's datasets under the same --data-root (embedded datasets ship with
the packages). Ray is an optional dependency: `pip install 'exitbench[ray]'`.
"""
from __future__ import annotations

import os
import signal
import socket
import tempfile
from pathlib import Path

from benchmark.errors import UserError
from benchmark.pipeline import safe_execute
from benchmark.spec import RunSpec
from benchmark.store import ResultsStore, pack_folder
from benchmark.weights import IMAGENET, staged_file

MAX_RETRIES = 3
"""Times Ray reruns a task whose worker died (killed, out of memory, node lost) before the run counts as lost."""


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'exitbench[ray]' (on every node of the cluster)") \
            from None
    return ray


def connect(address: str | None) -> bool:
    """Join the cluster at `address` ("auto": the one `ray start` runs on this node; HOST:PORT), or start a local one
    when None; an already initialised Ray (a test's `ray.init(num_cpus=2)`) is used as it is. Returns whether this
    call started Ray, so the caller shuts down only what it started."""
    ray = _ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")    # a lost run is reported once, by `collect`
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")     # raylet lines (a worker died) as text, not ANSI colour codes
    bench_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address not in (None, "auto"):
            _probe(address)                  # ray.init retries an unreachable address for minutes
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        # ray.init installs its own SIGTERM handler (a C++ stack dump, exit 1, no resume hint): bench's takes
        # Ctrl-C's path, so the run in flight stays pending, the Ray this call started is shut down, exit 143
        signal.signal(signal.SIGTERM, bench_sigterm)
    except (ConnectionError, OSError, ValueError) as error:
        raise UserError(f"could not reach a Ray cluster at --address {address}: {str(error).rstrip('.')}. Start one "
                        "with `ray start --head` (then --address auto on that node, or HOST:PORT as it prints), or "
                        "leave out --address for a local Ray") from None
    return True


def _probe(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("expected auto or HOST:PORT")
    socket.create_connection((host, int(port)), timeout=5).close()


def disconnect() -> None:
    _ray().shutdown()


def cluster_resources() -> dict[str, float]:
    resources = _ray().cluster_resources()
    return {"CPU": resources.get("CPU", 0.0), "GPU": resources.get("GPU", 0.0)}


def resolve_resources(device: str, cpus_per_run: int | None, gpus_per_run: float | None) -> tuple[str, int, float]:
    """(device type of every run, CPUs and GPUs each task declares). `--device auto` means cuda when the cluster
    has GPUs; the runs' device decides their P1 backbone ids, so it is decided once, here, for the whole grid."""
    available = cluster_resources()
    if gpus_per_run is None:
        gpus_per_run = 1.0 if device == "cuda" or (device == "auto" and available["GPU"] > 0) else 0.0
    if device == "cpu" and gpus_per_run > 0:
        raise UserError(f"--device cpu with {gpus_per_run:g} GPUs per run: drop --gpus-per-run or use --device cuda")
    if gpus_per_run > available["GPU"]:
        raise UserError(f"each run asks for {gpus_per_run:g} GPUs but the Ray cluster has {available['GPU']:g}: "
                        "add GPU nodes, or lower --gpus-per-run (0 trains on CPUs)")
    cpus = cpus_per_run or 1
    if cpus > available["CPU"]:
        raise UserError(f"each run asks for {cpus} CPUs but the Ray cluster has {available['CPU']:g}: lower "
                        "--cpus-per-run")
    return ("cuda" if gpus_per_run > 0 else "cpu"), cpus, gpus_per_run


def train_run(spec_json: dict, p1_id: str | None, backbone: dict[str, bytes] | None, data_root: str,
              device_type: str, threads: int, extras: dict,
              weights: bytes | None = None) -> tuple[tuple, dict[str, bytes] | None]:
    """The body of a task: train one run in a private store, return ((run id, status, message, the run folder's
    files), the backbone's files if this run trained it) — two Ray objects, so dependants wait on the second alone.
    `weights`: the staged pretrained weights file the run starts from (benchmark/weights.py), if any. Resource
    errors of the node propagate (the run stays pending)."""
    import torch

    spec = RunSpec.from_json(spec_json)
    with tempfile.TemporaryDirectory(prefix="exitbench-run-") as root:
        store = ResultsStore(root)
        if weights is not None:
            staged_file(store.root, spec.model["weights"]).parent.mkdir(parents=True)
            staged_file(store.root, spec.model["weights"]).write_bytes(weights)
        if backbone is not None:
            store.backbone_dir(p1_id).mkdir(parents=True)
            for name, content in backbone.items():
                (store.backbone_dir(p1_id) / name).write_bytes(content)
        status, message = safe_execute(spec, store, data_root=Path(data_root), device=torch.device(device_type),
                                       threads=threads, **extras)
        trained = (pack_folder(store.backbone_dir(p1_id))
                   if p1_id and backbone is None and store.backbone_inspect(p1_id)[0] else None)
        return (spec.run_id, status, message, pack_folder(store.run_dir(spec.run_id))), trained


def submit_runs(stages: list[list[RunSpec]], store: ResultsStore, p1_of: dict[str, str | None], *, data_root: Path,
                device_type: str, cpus: int, gpus: float, extras: dict):
    """Submit every run; returns ({result ref: spec}, {result ref: its backbone ref}). Runs of the first stage train the backbones the others need,
    so a dependant's backbone argument is the trainer's backbone ref (or the stored backbone, put once)."""
    ray = _ray()
    task = ray.remote(train_run).options(name="exitbench.train_run", num_cpus=cpus, num_gpus=gpus,
                                         max_retries=MAX_RETRIES, retry_exceptions=False, num_returns=2)
    backbone_refs: dict[str, object] = {}
    weights_refs: dict[str, object] = {}          # the staged pretrained weights, put once each
    refs, backbones = {}, {}
    for stage in stages:
        for spec in stage:
            weights = spec.model.get("weights")
            if weights is not None and weights != IMAGENET and weights not in weights_refs:
                weights_refs[weights] = ray.put(staged_file(store.root, weights).read_bytes())
            p1_id = p1_of[spec.run_id]
            backbone = None
            if p1_id and p1_id not in backbone_refs and store.backbone_inspect(p1_id)[0]:
                backbone_refs[p1_id] = ray.put(pack_folder(store.backbone_dir(p1_id)))
            if p1_id:
                backbone = backbone_refs.get(p1_id)
            result, trained = task.remote(spec.to_json(), p1_id, backbone, str(data_root),
                                          device_type, cpus, extras, weights_refs.get(weights))
            if p1_id and p1_id not in backbone_refs:
                backbone_refs[p1_id] = trained
            refs[result], backbones[result] = spec, trained
    return refs, backbones


def collect(refs: dict, backbones: dict, store: ResultsStore, p1_of: dict[str, str | None], record, lost) -> None:
    """Store each run as its task finishes: `record(spec, status, message)`; `lost(spec, reason)` for a task that
    failed for good (its worker died MAX_RETRIES + 1 times, or its node had a resource error): the run stays
    pending. Ctrl-C cancels the tasks still out and propagates."""
    ray = _ray()
    waiting = list(refs)
    try:
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1)
            spec = refs[ready[0]]
            try:
                run_id, status, message, run_files = ray.get(ready[0])
                backbone_files = ray.get(backbones[ready[0]])
            except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError, ray.exceptions.TaskCancelledError) as error:
                lost(spec, _first_line(error))
                continue
            p1_id = p1_of[run_id]
            if backbone_files is not None and not store.backbone_inspect(p1_id)[0]:
                store.receive(store.backbone_dir(p1_id), backbone_files)
            store.receive(store.run_dir(run_id), run_files)
            state, problem = store.inspect(run_id)
            if problem:
                lost(spec, f"the run arrived damaged ({problem})")
            else:
                record(spec, status, message)
    except KeyboardInterrupt:
        for ref in waiting:
            ray.cancel(ref, force=True)
        raise


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:300]
