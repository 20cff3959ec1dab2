"""The data flow of one run (DESIGN.md): spec -> data -> MultiExitNet -> phases -> per-exit logits ->
evaluation from the stored logits -> files, `metrics.json` last.

P1 backbones are shared: the first run that needs one trains and stores it under `backbones/<p1_id>/`, every
later disjoint*/mixed* run of the same (dataset, arch, seed, P1 budget, training settings) loads it. Its cost is
charged to every run that uses it (`p1_reused` says whether this run paid it in wall time).
"""
from __future__ import annotations

import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from benchmark import flops as flop_count
from benchmark.data import load_dataset
from benchmark.determinism import configure, derive_seed, eval_batch_size, rng_state, seed_everything, set_rng_state
from benchmark.evaluate import evaluate, validation_area
from benchmark.models import build_model, exit_placement
from benchmark.models.eval_mode import evaluating
from benchmark.snapshots import InformationSnapshots
from benchmark.spec import RunSpec
from benchmark.store import (DONE, RESOURCE_ERRNOS, ResultsStore, file_digest, folder_digests, read_csv, read_json,
                             read_dense, read_logits, read_torch, write_csv, write_json, write_npz, write_torch)
from benchmark.provenance import code_version
from benchmark.tuning import TUNING_METRIC
from benchmark.weights import IMAGENET, load_backbone, staged_weights
from benchmark.train import PhaseCost, compile_for_training, eager, held, run_phase
from regimes.base import Budget, Phase
from regimes.registry import build_regime

EpochCallback = Callable[[str, int, float], None]
CHECKPOINT = "checkpoint.pt"
"""A tuning rung's state (weights, optimizer, schedule, objective, random streams, history and cost so far)."""


def initial_model(spec: RunSpec, data, device: torch.device, pretrained: bool = True):
    """Same weights for every regime of a (dataset, arch, seed): seeded by the pairing seed only. The regime's exit
    combiner (boosted's ensemble) is part of the model, so every forward — training, evaluation, analyses, `bench
    latency` — sees the exits' real outputs. `pretrained=False`: for a model whose trained weights are loaded next
    (model.pt), so a run started from "imagenet" weights does not download them again."""
    seed_everything(spec.pairing_seed)
    model = build_model(spec.arch, data.num_classes, data.input_shape, head=spec.model["head"],
                        exits=spec.model["exits"], pretrained=pretrained and spec.model.get("weights") == IMAGENET)
    model.combiner = build_regime(spec.regime, spec.hparams).objective.exit_combiner(model, data.num_classes)
    model = model.to(device)
    if device.type == "cuda" and len(data.input_shape) == 3:
        model = model.to(memory_format=torch.channels_last)
    return model


def collect_logits(model, x: torch.Tensor, batch_size: int = 512,
                   prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Per-exit logits (K, N, C) in float32 — what logits.npz stores and every metric is computed from.

    Full float32 even on a GPU: no bf16 autocast and no TF32 (training enables both), because every exit decision
    compares confidences and a rounded logit can flip one (bf16 keeps 8 significant bits, TF32 11). Never a
    compiled (--fast) graph either: the stored logits come from the eager model. `prepare` turns a batch of stored
    values into model inputs (`Dataset.normalise` for uint8 pixels); the batch size is fixed per device type
    (`eval_batch_size`).
    """
    return torch.cat([logits.cpu() for _, logits in eval_forward(model, x, batch_size, prepare)], dim=1).numpy()


def eval_forward(model, x: torch.Tensor, batch_size: int = 512,
                 prepare: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """THE evaluation forward, batch by batch: yields (start, per-exit float32 logits (K, B, ...)) on the model's
    device, under the settings `collect_logits` states (eval mode, eager, no TF32). Classification stores the logits;
    segmentation reduces each batch to what `benchmark.dense` stores (`collect_dense`)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with evaluating(model), eager():
            for start in range(0, len(x), batch_size):
                batch = x[start:start + batch_size]
                yield start, torch.stack(model(batch if prepare is None else prepare(batch))).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def collect_dense(model, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int = 512,
                  prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """A segmentation split's per-(exit, image) confusion matrices (K, N, C, C) int64, confidence summaries
    (rule -> (K, N) float64) and calibration sums (reliability (K, N, B, 3), likelihood (K, N, 2)) from the one
    evaluation forward (`eval_forward`): what dense.npz stores instead of per-pixel logits (`benchmark.dense`)."""
    from analysis.calibration import N_BINS
    from benchmark.dense import SUMMARY_RULES, calibration_sums, confusion_per_image, summaries

    parts: dict[str, list[torch.Tensor]] = {key: [] for key in ("confusion", "reliability", "likelihood",
                                                                *SUMMARY_RULES)}
    for start, logits in eval_forward(model, x, batch_size, prepare):
        labels = y[start:start + logits.shape[1]].to(logits.device)
        per_exit = [summaries(z) for z in logits]
        parts["confusion"].append(torch.stack([confusion_per_image(z, labels, num_classes) for z in logits]).cpu())
        calibration = [calibration_sums(z, labels, N_BINS) for z in logits]
        parts["reliability"].append(torch.stack([bins for bins, _ in calibration]).cpu())
        parts["likelihood"].append(torch.stack([sums for _, sums in calibration]).cpu())
        for rule in SUMMARY_RULES:
            parts[rule].append(torch.stack([summary[rule] for summary in per_exit]).cpu())
    return {key: torch.cat(chunks, dim=1).numpy() for key, chunks in parts.items()}


def _split(data, split: str, device: torch.device) -> tuple[torch.Tensor, int, Callable]:
    """collect_logits' arguments for a split: as held, the device's evaluation batch size, the normalising rule."""
    x, prepare = held(data, split)
    return x, eval_batch_size(device), prepare


class _EagerSnapshots:
    """Information snapshots whose forwards run eagerly (never a compiled --fast graph)."""

    def __init__(self, model, data, every: int, samples: int):
        self.taker = InformationSnapshots(model, data, every, samples)

    def __call__(self, global_epoch: int) -> None:
        with eager():
            self.taker(global_epoch)

    def table(self) -> pd.DataFrame:
        return self.taker.table()


def placement_columns(spec: RunSpec, data) -> dict[str, list]:
    """Per exit: the block it follows, the FLOPs fraction the grid asked for and the backbone fraction it got
    (the final exit: the whole backbone)."""
    placements = exit_placement(spec.arch, data.num_classes, data.input_shape, spec.model["exits"])
    return {"target_fraction": [p.target for p in placements] + [1.0],
            "backbone_fraction": [p.achieved for p in placements] + [1.0]}


def _history_frame(rows: list[dict], spec: RunSpec) -> pd.DataFrame:
    return pd.DataFrame(rows).assign(run_id=spec.run_id)


def obtain_p1(spec: RunSpec, phase: Phase, model, data, store: ResultsStore, device: torch.device,
              on_epoch: EpochCallback | None,
              snapshots: _EagerSnapshots | None) -> tuple[list[dict], PhaseCost, bool, pd.DataFrame]:
    """Load the shared P1 backbone into `model`, training and storing it first if it is not stored intact. Also
    returns the information snapshots taken during P1 (empty if none were asked for when it was trained).

    `p1_reused` is False for the run that trained the backbone, also when it is rerun after a kill that came
    between storing the backbone and finishing the run: who paid for P1 does not depend on when a kill happened.
    """
    p1_id = spec.p1_id(phase.epochs, device.type)
    folder = store.backbone_dir(p1_id)
    with store.backbone_lock(p1_id):
        if store.backbone_inspect(p1_id)[0]:
            model.load_network_state(read_torch(folder / "model.pt"))
            history = read_csv(folder / "history.csv").to_dict("records")
            snapshot_file = folder / "information_snapshots.csv"
            taken = read_csv(snapshot_file) if snapshot_file.is_file() else pd.DataFrame()
            stored = read_json(folder / "cost.json")
            return history, PhaseCost(**stored["cost"]), stored["trained_by"] != spec.run_id, taken
        for stale in folder.iterdir():              # a damaged or half-stored backbone: train it afresh
            if stale.is_file() and not stale.name.startswith("."):
                stale.unlink()
        if snapshots:
            snapshots(0)
        result = run_phase(model, phase, None, data, spec.train, pairing_seed=spec.pairing_seed,
                           epoch_offset=0, device=device, on_epoch=on_epoch, after_epoch=snapshots)
        taken = snapshots.table() if snapshots else pd.DataFrame()
        if not taken.empty:
            write_csv(folder / "information_snapshots.csv", taken)
        state = {k: v.detach().cpu().contiguous() for k, v in model.network_state().items()}
        write_json(folder / "spec.json", {"p1_id": p1_id, "dataset": spec.dataset, "arch": spec.arch,
                                          "seed": spec.seed, "epochs": phase.epochs, "train": spec.train,
                                          "model": spec.model, **({"fast": True} if spec.fast else {})})
        write_csv(folder / "history.csv", pd.DataFrame(result.history))
        write_torch(folder / "model.pt", state)
        write_json(folder / "cost.json", {"cost": asdict(result.cost), "device": str(device),      # last = stored
                                          "trained_by": spec.run_id, "model_sha256": file_digest(folder / "model.pt")})
        return result.history, result.cost, False, taken


def execute_run(spec: RunSpec, store: ResultsStore, *, data_root: Path, device: torch.device, threads: int,
                on_epoch: EpochCallback | None = None, keep_model: bool = False, snapshot_every: int = 0,
                snapshot_samples: int = 250, timing_batch: str | None = None) -> dict:
    """Train, evaluate and store one run. Returns metrics.json's content. Raises on failure (see `safe_execute`).
    `snapshot_every` > 0 records the information plane every k epochs (runs/<id>/information_snapshots.csv);
    metrics.json records the code (`provenance.code_version`) and `timing_batch`, the sitting it was timed in."""
    started = time.perf_counter()
    environment = configure(device, threads, fast=spec.fast)
    folder = store.start_run(spec.run_id)
    write_json(folder / "spec.json", spec.to_json())
    data = load_dataset(spec.dataset, data_root).to(device)
    regime = build_regime(spec.regime, spec.hparams)
    model = initial_model(spec, data, device)
    pretrained = spec.model.get("weights")
    started_from = None if pretrained is None else {"weights": pretrained, "classifier_loaded": None}
    if pretrained is not None and pretrained != IMAGENET:
        started_from["classifier_loaded"] = load_backbone(model, staged_weights(store.root, pretrained))
    profile = flop_count.profile_flops(model, data.input_shape)          # one counting pass for every number
    costs = {"backbone": sum(profile.blocks) + profile.classifier,
             "exits": flop_count.exit_costs_of(profile, model.exit_blocks)}
    environment.update(compile_for_training(model, data, spec.train["batch_size"], device) if spec.fast
                       else {"compiled": False, "compile_error": None})

    budget = Budget(spec.train["epochs"], spec.train["p1_epochs"])
    history, phase_costs, epoch_offset, p1_reused = [], [], 0, False
    snapshots = _EagerSnapshots(model, data, snapshot_every, snapshot_samples) if snapshot_every else None
    p1_snapshots = pd.DataFrame()
    resumed = None if snapshots else latest_checkpoint(spec, store)
    start = 0 if resumed is None else resumed["epoch"]
    if resumed is not None:
        history, phase_costs, p1_reused = resumed["history"], resumed["phase_costs"], resumed["p1_reused"]
    for phase in regime.phases(budget):
        if phase.epochs == 0:
            continue
        if phase.name == "P1" and pretrained is not None:      # the pretrained backbone is the backbone-first result
            phase_costs.append({"phase": "P1", "trains": phase.trains, "epochs": 0, **asdict(PhaseCost()),
                                "shared_p1_reused": False, "skipped": f"pretrained weights {pretrained}"})
            epoch_offset += phase.epochs              # later phases keep the batches they see without weights
            continue
        end = epoch_offset + phase.epochs
        if end <= start:                       # trained before the checkpoint: its rows and cost are in it
            epoch_offset = end
            continue
        stop = spec.stop_after - epoch_offset if spec.stop_after is not None and spec.stop_after < end else None
        seed_everything(derive_seed(spec.pairing_seed, "phase", phase.name))
        if phase.name == "P1":
            p1_taker = _EagerSnapshots(model, data, snapshot_every, snapshot_samples) if snapshots else None
            rows, cost, p1_reused, p1_snapshots = obtain_p1(spec, phase, model, data, store, device, on_epoch,
                                                            p1_taker)
        else:
            if snapshots and epoch_offset == 0:
                snapshots(0)
            inside = start > epoch_offset
            if inside:                        # resume mid-phase: weights, objective, then the random streams
                model.load_state_dict(resumed["model"])
                regime.objective.load_state_dict(resumed["objective"], model)
                set_rng_state(resumed["rng"])
            result = run_phase(model, phase, regime.objective, data, spec.own_phase_train, pairing_seed=spec.pairing_seed,
                               epoch_offset=epoch_offset, device=device, on_epoch=on_epoch, after_epoch=snapshots,
                               start_epoch=start - epoch_offset if inside else 0, stop_epoch=stop,
                               resume=resumed["phase"] if inside else None)
            rows, cost = (resumed["phase_rows"] if inside else []) + result.history, result.cost
            if stop is not None:
                return _finish_rung(spec, store, folder, model, regime.objective, data, device, costs, started,
                                    environment, history=history, phase_costs=phase_costs, p1_reused=p1_reused,
                                    phase_rows=rows, phase_state=result.state(), resumed=resumed)
        history += rows
        phase_costs.append({"phase": phase.name, "trains": phase.trains, "epochs": phase.epochs, **asdict(cost),
                            "shared_p1_reused": phase.name == "P1" and p1_reused})
        epoch_offset += phase.epochs
    write_csv(folder / "history.csv", _history_frame(history, spec))
    if snapshots:
        taken = pd.concat([p1_snapshots, snapshots.table()], ignore_index=True)
        write_csv(folder / "information_snapshots.csv", labelled(taken, spec))

    evaluation = stored_evaluation(model, data, folder, device, costs)
    write_csv(folder / "exits.csv", evaluation.exits.assign(**placement_columns(spec, data), run_id=spec.run_id))
    write_csv(folder / "curves.csv", evaluation.curves.assign(run_id=spec.run_id))
    write_csv(folder / "selected.csv", evaluation.selected.assign(run_id=spec.run_id))
    if keep_model:
        write_torch(folder / "model.pt", {k: v.detach().cpu() for k, v in model.state_dict().items()})

    metrics = {
        **spec.labels,
        "summary": evaluation.summary,
        "flops": {"unit": "FLOPs (1 multiply-add = 2 FLOPs), per sample", "backbone": costs["backbone"],
                  "exits": costs["exits"]},
        "cost": _run_cost(phase_costs, p1_reused, started, resumed),
        "num_exits": model.num_exits, "environment": environment,
        **({"pretrained": started_from} if started_from else {}),
        "provenance": {**code_version(), "timing_batch": timing_batch},
        "files": folder_digests(folder),
    }
    write_json(folder / "metrics.json", metrics)     # last: its presence marks the run done
    return metrics


def labelled(frame: pd.DataFrame, spec: RunSpec) -> pd.DataFrame:
    """A per-run table with the run's labels (`RunSpec.labels`) as its first columns."""
    labels = spec.labels
    return frame.assign(**labels)[[*labels, *frame.columns]]


def stored_evaluation(model, data, folder: Path, device: torch.device, costs: dict):
    """Evaluate the trained model on validation and test: store the outputs every metric is computed from —
    logits.npz, or dense.npz for segmentation (`benchmark.dense`) — and evaluate what is on disk, read back and
    checked, nothing else."""
    exit_flops = np.asarray(costs["exits"])
    if data.task == "segmentation":
        from analysis.calibration import N_BINS
        from benchmark.dense import SUMMARY_RULES, evaluate_dense
        arrays = {f"{split}_{key}": value for split in ("val", "test")
                  for key, value in _dense_outputs(model, data, split, device).items()}
        write_npz(folder / "dense.npz", **arrays, exit_flops=exit_flops)
        stored = read_dense(folder / "dense.npz", model.num_exits, len(data.y_val), len(data.y_test),
                            data.num_classes, SUMMARY_RULES, N_BINS)
        return evaluate_dense(stored["val"], stored["test"], stored["exit_flops"], costs["backbone"])
    val_logits = collect_logits(model, *_split(data, "val", device))
    test_logits = collect_logits(model, *_split(data, "test", device))
    val_y, test_y = data.y_val.cpu().numpy(), data.y_test.cpu().numpy()
    write_npz(folder / "logits.npz", val=val_logits, test=test_logits, val_y=val_y, test_y=test_y,
              exit_flops=exit_flops)
    stored = read_logits(folder / "logits.npz", model.num_exits, len(val_y), len(test_y))
    return evaluate(stored["val"], stored["val_y"], stored["test"], stored["test_y"],
                    stored["exit_flops"], costs["backbone"])


def validation_scores(model, data, device: torch.device, costs: dict) -> tuple[float, list[float]]:
    """A tuning rung's score from the validation split alone (no test data is read): the validation area and every
    exit's validation accuracy (mIoU for segmentation)."""
    if data.task == "segmentation":
        from benchmark.dense import dense_validation_area, mean_iou
        outputs = _dense_outputs(model, data, "val", device)
        area = dense_validation_area(outputs, np.asarray(costs["exits"]), costs["backbone"])
        return area, mean_iou(outputs["confusion"].sum(axis=1)).tolist()
    val_logits = collect_logits(model, *_split(data, "val", device))
    val_y = data.y_val.cpu().numpy()
    area = validation_area(val_logits, val_y, np.asarray(costs["exits"]), costs["backbone"])
    return area, (val_logits.argmax(-1) == val_y).mean(axis=1).tolist()


def _dense_outputs(model, data, split: str, device: torch.device) -> dict[str, np.ndarray]:
    x, batch_size, prepare = _split(data, split, device)
    return collect_dense(model, x, getattr(data, f"y_{split}"), data.num_classes, batch_size, prepare)


def _run_cost(phase_costs: list[dict], p1_reused: bool, started: float, resumed: dict | None) -> dict:
    """metrics.json's cost: the phases' sums, and wall time of the whole trajectory — a run resumed from a tuning
    rung's checkpoint is charged what its rungs spent (`resumed_from` names the last), `segment_wall_seconds` is
    what this process spent."""
    segment = time.perf_counter() - started
    total = {key: sum(c[key] for c in phase_costs) for key in
             ("wall_seconds", "optimizer_steps", "examples_seen", "train_flops")}
    before = 0.0 if resumed is None else resumed["run_wall_seconds"]
    return {**total, "phases": phase_costs, "p1_reused": p1_reused, "run_wall_seconds": before + segment,
            "segment_wall_seconds": segment, "resumed_from": None if resumed is None else resumed["run_id"]}


def latest_checkpoint(spec: RunSpec, store: ResultsStore) -> dict | None:
    """The checkpoint of the latest done rung of `spec`'s trajectory that stops before `spec` does, if one is intact;
    None: train from the start (the same numbers, only slower). A missing or damaged checkpoint.pt (pruned, or
    edited) is passed over: it is not one of the files a rung's metrics.json vouches for, so the rung stays done."""
    last = spec.stop_after if spec.stop_after is not None else spec.train["epochs"] + _final_epochs(spec)
    for epoch in range(last - 1, 0, -1):
        rung = spec.trajectory.at_epoch(epoch)
        folder = store.run_dir(rung.run_id)
        if not (folder / CHECKPOINT).is_file() or store.state(rung.run_id) != DONE:
            continue
        if file_digest(folder / CHECKPOINT) != read_json(folder / "metrics.json").get("checkpoint_sha256"):
            continue
        return read_torch(folder / CHECKPOINT)
    return None


def _final_epochs(spec: RunSpec) -> int:
    return sum(p.epochs for p in build_regime(spec.regime, spec.hparams).objective.final_phases())


def _finish_rung(spec: RunSpec, store: ResultsStore, folder: Path, model, objective, data, device, costs, started,
                 environment, *, history, phase_costs, p1_reused, phase_rows, phase_state, resumed) -> dict:
    """A tuning rung stops here: its validation area (no test data is read), its history, and checkpoint.pt —
    everything the next rung or the full run needs to go on bitwise — then metrics.json, last."""
    area, val_accuracy = validation_scores(model, data, device, costs)
    partial = {"phase": phase_rows[-1]["phase"], "epochs_done": phase_rows[-1]["epoch"], **phase_state["cost"]}
    cost = _run_cost(phase_costs + [partial], p1_reused, started, resumed)
    write_csv(folder / "history.csv", _history_frame(history + phase_rows, spec))
    write_torch(folder / CHECKPOINT, {
        "run_id": spec.run_id, "epoch": spec.stop_after, "model": model.state_dict(),
        "objective": objective.state_dict(), "rng": rng_state(), "phase": phase_state, "phase_rows": phase_rows,
        "history": history, "phase_costs": phase_costs, "p1_reused": p1_reused,
        "run_wall_seconds": cost["run_wall_seconds"]})
    metrics = {
        **spec.labels,
        "stop_after": spec.stop_after,
        "summary": {TUNING_METRIC: area, "val_accuracy": val_accuracy},
        "cost": cost, "num_exits": model.num_exits, "environment": environment,
        "checkpoint_sha256": file_digest(folder / CHECKPOINT),
        "files": {name: digest for name, digest in folder_digests(folder).items() if name != CHECKPOINT},
    }
    write_json(folder / "metrics.json", metrics)
    return metrics


def safe_execute(spec: RunSpec, store: ResultsStore, **kwargs) -> tuple[str, str | None]:
    """Run and record failure in error.json instead of raising, so the grid goes on. Interrupts and errors of the
    machine (full disk, I/O, permissions: RESOURCE_ERRNOS) propagate and leave the run pending."""
    try:
        execute_run(spec, store, **kwargs)
        return "done", None
    except OSError as error:
        if error.errno in RESOURCE_ERRNOS:
            raise
        return _record_failure(spec, store, error)
    except Exception as error:  # noqa: BLE001 — any failure of one run is recorded, the grid continues
        return _record_failure(spec, store, error)


def _record_failure(spec: RunSpec, store: ResultsStore, error: Exception) -> tuple[str, str]:
    message = str(error) or type(error).__name__
    write_json(store.run_dir(spec.run_id) / "error.json",
               {"run_id": spec.run_id, "error": message, "type": type(error).__name__,
                "traceback": traceback.format_exc()})
    return "failed", message
