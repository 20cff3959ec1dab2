"""Grid values that only training used to refuse (objective hyperparameters, heads, exits) are refused when the grid
loads, naming the file, the key the value came from and, for heads and exits, the cell."""
import re

import pytest
from click.testing import CliRunner

import benchmark.models
from benchmark.cli import main
from benchmark.errors import UserError
from benchmark.grid import load_grid

BASE = 'datasets = ["digits"]\narchs = ["small_cnn"]\nregimes = ["joint+distill"]\nseeds = [0]\n[train]\nepochs = 2\n'
TUNING = "[tuning]\nseeds = [9]\nlr = [0.1]\n"


def write(tmp_path, extra: str, base: str = BASE):
    path = tmp_path / "g.toml"
    path.write_text(base + extra)
    return path


@pytest.mark.parametrize("extra, key, problem", [
    ('[hparams.distill]\ntemperature = "hot"\n', "hparams.distill.temperature",
     "distill.temperature must be a number > 0, got 'hot'"),
    ("[hparams.distill]\nweight = 5.0\n", "hparams.distill.weight", "distill.weight must be a number in [0, 1], got 5.0"),
    ('[hparams.distill]\nteacher = "oracle"\n', "hparams.distill.teacher", "one of last | next | later"),
    ("[hparams.bdl]\ngroups = 2.5\n", "hparams.bdl.groups", "an integer >= 1"),   # objectives outside regimes too
    ("[hparams.sdn]\nc_max = true\n", "hparams.sdn.c_max", "a number in [0, 1], got True"),
    (TUNING + "[tuning.hparams.distill]\ntemperature = [4.0, 0]\n", "tuning.hparams.distill.temperature",
     "distill.temperature must be a number > 0, got 0"),
])
def test_objective_hyperparameters_are_checked_against_their_declaration(tmp_path, extra, key, problem):
    path = write(tmp_path, extra)
    with pytest.raises(UserError) as error:
        load_grid(str(path))
    assert f"grid file {path}: key '{key}': " in str(error.value) and problem in str(error.value)


@pytest.mark.parametrize("extra, key, problem", [
    ('[model]\nhead = "nosuchhead"\n', "model.head", "unknown head 'nosuchhead'"),
    ('[model]\nexits = "nonsense"\n', "model.exits", "got 'nonsense'"),
    ("[model]\nexits = [0, 99]\n", "model.exits", "must lie in [0, 7] for a backbone of 9 blocks"),
    ('[model]\nexits = "flops:2.0,abc"\n', "model.exits", "fractions in (0, 1)"),
    ("[arch_overrides.small_cnn]\nexits = [0, 99]\n", "arch_overrides.small_cnn.exits", "got [0, 99]"),
    ('[arch_overrides.small_cnn]\nexits = "nonsense"\n[cell_overrides."digits/*"]\nexits = [0, 99]\n',
     'cell_overrides."digits/*".exits', "got [0, 99]"),    # the cell's value is the last table's
])
def test_heads_and_exits_are_checked_per_cell_naming_the_table_they_came_from(tmp_path, extra, key, problem):
    path = write(tmp_path, extra)
    with pytest.raises(UserError) as error:
        load_grid(str(path))
    message = str(error.value)
    assert f"grid file {path}: key '{key}': " in message and problem in message and "digits/small_cnn" in message


def test_a_head_that_cannot_read_the_arch_is_refused(tmp_path):
    path = write(tmp_path, '[model]\nhead = "pool"\n', BASE.replace('"small_cnn"', '"vit_tiny"'))
    with pytest.raises(UserError, match=r"key 'model.head': head 'pool' needs feature maps.*digits/vit_tiny"):
        load_grid(str(path))


def test_an_override_that_fixes_a_value_is_what_counts(tmp_path):
    path = write(tmp_path, "[model]\nexits = [0, 99]\n[arch_overrides.small_cnn]\nexits = [1, 3]\n")
    assert {str(s.model["exits"]) for s in load_grid(str(path)).specs} == {"[1, 3]"}


def test_each_distinct_model_is_checked_once(tmp_path, monkeypatch):
    calls = []
    real = benchmark.models.exit_placement
    monkeypatch.setattr(benchmark.models, "exit_placement", lambda *args: calls.append(args) or real(*args))
    base = BASE.replace('["digits"]', '["digits", "mnist5k"]').replace('["joint+distill"]', '["joint", "mixed"]')
    grid = load_grid(str(write(tmp_path, "", base.replace("[0]", "[0, 1, 2]"))))
    assert len(grid.specs) == 12 and len(calls) == 1     # same arch, classes, kind, head and exits


def test_dry_run_refuses_the_grid_in_one_line_and_creates_nothing(tmp_path):
    path, results = write(tmp_path, "[model]\nexits = [0, 99]\n"), tmp_path / "results"
    result = CliRunner().invoke(main, ["run", "--grid", str(path), "--dry-run", "--results", str(results)])
    assert result.exit_code == 2 and not result.stdout
    assert result.stderr.startswith(f"error: grid file {path}: key 'model.exits': ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not results.exists()


@pytest.mark.parametrize("extra, key, problem", [
    ("[resources]\ncpus_per_run = 0\n", "resources.cpus_per_run", "a whole number >= 1, got 0"),
    ("[resources]\ncpus_per_run = 1.5\n", "resources.cpus_per_run", "a whole number >= 1, got 1.5"),
    ("[resources]\ngpus_per_run = -1\n", "resources.gpus_per_run", "a number >= 0, got -1"),
    ("[resources]\ngpu_per_run = 1\n", "resources.gpu_per_run", "did you mean 'gpus_per_run'"),
])
def test_ray_resources_are_checked(tmp_path, extra, key, problem):
    path = write(tmp_path, extra)
    with pytest.raises(UserError) as error:
        load_grid(str(path))
    assert f"key '{key}'" in str(error.value) and problem in str(error.value)


def test_declared_resources_are_read(tmp_path):
    grid = load_grid(str(write(tmp_path, "[resources]\ncpus_per_run = 4\ngpus_per_run = 0.5\n")))
    assert grid.resources == {"cpus_per_run": 4, "gpus_per_run": 0.5}


@pytest.mark.parametrize("extra, key, problem", [
    ("", "train.lr", "must be a finite number, got inf"),
    ("", "train.lr", "must be a finite number, got nan"),
    ("[tuning]\nseeds = [100]\nlr = [0.1, inf]\n", "tuning.lr[1]", "must be a finite number, got inf"),
])
def test_a_non_finite_number_anywhere_is_refused_at_load(grid_file, extra, key, problem):
    """`lr = inf` once trained, failed and stored null in spec.json (so the run id no longer matched) and exited 0."""
    lr = "nan" if "nan" in problem else ("inf" if not extra else "0.05")
    path = grid_file(extra=extra)
    path.write_text(path.read_text().replace("lr = 0.05\n", f"lr = {lr}\n", 1))
    with pytest.raises(UserError, match=re.escape(f"key '{key}': {problem}")):
        load_grid(str(path))


@pytest.mark.parametrize("setting, key, problem", [
    ("momentum = -0.5", "train.momentum", "must be a number >= 0"),
    ("weight_decay = -1.0", "train.weight_decay", "must be a number >= 0"),
    ("momentum = 0\nnesterov = true", "train.nesterov", "Nesterov momentum needs momentum > 0"),
    ("batch_size = true", "train.batch_size", "expected int, got True"),
])
def test_optimizer_values_torch_refuses_are_refused_at_load(grid_file, setting, key, problem):
    path = grid_file()
    text = path.read_text()
    for line in setting.split("\n"):
        name = line.split(" = ")[0]
        text = re.sub(rf"(?m)^{name} = .*\n", "", text)
    path.write_text(text.replace("[train]\n", f"[train]\n{setting}\n", 1))
    with pytest.raises(UserError, match=re.escape(f"key '{key}': ") + ".*" + re.escape(problem)):
        load_grid(str(path))


def test_a_grid_without_early_exits_is_refused(grid_file):
    path = grid_file()
    path.write_text(path.read_text().replace('exits = "flops:0.25,0.5,0.75"', "exits = []"))
    with pytest.raises(UserError, match="key 'model.exits': lists no exit"):
        load_grid(str(path))


@pytest.mark.parametrize("values", [
    {"lr": 0.05, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "batch_size": 64, "p1_epochs": None},
    {"lr": 1e-300, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "batch_size": 1, "p1_epochs": 3},
])
def test_a_spec_round_trips_through_spec_json_exactly(values):
    """Every field type a spec holds — strings, ints, floats (tiny and zero), bools, None, lists, nested dicts — comes
    back from spec.json equal, with the same run id."""
    import json
    from benchmark.spec import RunSpec
    spec = RunSpec(dataset="digits", arch="small_cnn", regime="mixed+sdn", seed=3,
                   train={"epochs": 10, "optimizer": "sgd", "eval_every": 1, **values},
                   model={"head": "pool", "exits": [1, 2, 3]}, hparams={"c_min": 0.15, "c_max": 0.9},
                   own_phases={"lr": 0.1}, fast=True, stop_after=5)
    back = RunSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec and back.run_id == spec.run_id


def test_a_grid_whose_exclude_removes_every_cell_says_so(grid_file):
    """It used to say "--only matches none of the 0 runs" although no --only was given (issue 22)."""
    path = grid_file()
    path.write_text('exclude = [{dataset = "digits", arch = "small_cnn"}]\n' + path.read_text())   # a top-level key
    with pytest.raises(UserError, match="key 'exclude': removes every \\(dataset, arch\\) cell: the grid has no runs"):
        load_grid(str(path))
