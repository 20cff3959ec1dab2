"""Atomic files, run states, and the results-folder lock."""
import json

import pytest

from benchmark.errors import UserError
from benchmark.store import DONE, FAILED, PENDING, ResultsStore, read_json, write_json


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
    store = ResultsStore(tmp_path)
    assert store.state("abc") == PENDING
    folder = store.start_run("abc")
    write_json(folder / "error.json", {"error": "boom"})
    assert store.state("abc") == FAILED and store.error("abc") == "boom"
    store.start_run("abc")                                  # a retry clears the failed attempt
    assert store.state("abc") == PENDING
    write_json(folder / "metrics.json", {})
    assert store.state("abc") == DONE and store.done_run_ids() == ["abc"]
    with pytest.raises(RuntimeError, match="already done"):
        store.start_run("abc")


def test_second_bench_run_on_the_same_folder_is_refused(tmp_path):
    store = ResultsStore(tmp_path)
    with store.lock():
        with pytest.raises(UserError, match="another `bench run` is using"):
            with ResultsStore(tmp_path).lock():
                pass
    with store.lock():      # released after use
        pass
