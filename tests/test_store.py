"""Atomic files, run states, and the results-folder lock."""
import json

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
