"""Atomic files, run states, and the results-folder lock."""
import json

import pandas as pd
import pytest

from benchmark.errors import UserError
from benchmark.spec import RunSpec
from benchmark.store import DONE, FAILED, PENDING, ResultsStore, folder_digests, read_json, write_json

SPEC = RunSpec(dataset="digits", arch="small_cnn", regime="joint", seed=0, train={"epochs": 2},
               model={"exits": "all"})


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1})

    class Unserialisable:
        pass

    with pytest.raises(TypeError):
        write_json(path, {"a": Unserialisable()})
    assert read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "no temporary file may be left behind"


def test_nan_is_stored_as_null_so_strict_parsers_read_it(tmp_path):
    write_json(tmp_path / "m.json", {"x": float("nan"), "y": [1.0, float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == \
        {"x": None, "y": [1.0, None]}


def test_run_states(tmp_path):
    store, run_id = ResultsStore(tmp_path), SPEC.run_id
    assert store.state(run_id) == PENDING
    folder = store.start_run(run_id)
    write_json(folder / "spec.json", SPEC.to_json())
    write_json(folder / "error.json", {"error": "boom"})
    assert store.state(run_id) == FAILED and store.error(run_id) == "boom"
    store.start_run(run_id)                                  # a retry clears the failed attempt
    assert store.state(run_id) == PENDING
    write_json(folder / "spec.json", SPEC.to_json())
    write_json(folder / "metrics.json", {"run_id": run_id, "files": folder_digests(folder)})
    assert store.state(run_id) == DONE and store.done_run_ids() == [run_id]
    with pytest.raises(RuntimeError, match="already done"):
        store.start_run(run_id)


def test_second_bench_run_on_the_same_folder_is_refused(tmp_path):
    store = ResultsStore(tmp_path)
    with store.lock():
        with pytest.raises(UserError, match="another `bench` command is writing to"):
            with ResultsStore(tmp_path).lock():
                pass
    with store.lock():      # released after use
        pass


def test_run_ids_that_look_like_numbers_stay_text_in_every_table(tmp_path):
    """pandas alone reads the run id 0077569e8576 as the float inf and 628798375431 as an integer: the committed
    quick tables lost four runs' ids that way (rank, information, landscape, robustness, sharpness). The suite's
    reader keeps them, and so does a table gathered from per-run files."""
    from types import SimpleNamespace

    from benchmark.analyze import _gather
    from benchmark.store import ResultsStore, read_csv, write_csv
    ids = ["0077569e8576", "628798375431", "ab12cd34ef56"]
    store = ResultsStore(tmp_path)
    for run_id in ids:
        write_csv(store.run_dir(run_id) / "rank.csv", pd.DataFrame({"run_id": [run_id], "effective_rank": [3.5]}))
    assert pd.read_csv(store.run_dir(ids[0]) / "rank.csv")["run_id"].iloc[0] == float("inf")   # the defect
    assert read_csv(store.run_dir(ids[0]) / "rank.csv")["run_id"].tolist() == [ids[0]]
    gathered = _gather(store, [SimpleNamespace(run_id=run_id) for run_id in ids], "rank.csv")
    assert gathered["run_id"].tolist() == ids
    write_csv(tmp_path / "rank.csv", gathered)
    assert read_csv(tmp_path / "rank.csv")["run_id"].tolist() == ids
