"""Cells whose settings make their numbers noise are flagged before anything trains."""
from click.testing import CliRunner

from benchmark.checks import MIN_VAL_PER_CLASS, cell_warnings
from benchmark.cli import main
from benchmark.grid import load_grid


def test_a_tiny_sensor_dataset_gets_both_warnings(grid_file, tmp_path):
    # basicmotions: 36 training series and 4 validation series (1 per class) — below a batch of 64 and the minimum
    grid = load_grid(str(grid_file(datasets=("basicmotions",), archs=("small_cnn1d",))))
    warnings = cell_warnings(grid.specs, tmp_path)
    assert any("basicmotions/small_cnn1d: batch size 64 exceeds the 36 training samples" in w for w in warnings)
    assert any(f"smallest class (minimum {MIN_VAL_PER_CLASS})" in w for w in warnings)


def test_a_sound_cell_gets_no_data_warning(grid_file, tmp_path):
    grid = load_grid(str(grid_file(datasets=("mnist5k",), archs=("small_cnn",))))
    assert not [w for w in cell_warnings(grid.specs, tmp_path) if "batch size" in w or "validation" in w]


def test_dry_run_prints_the_warnings(grid_file, tmp_path):
    grid = grid_file(datasets=("basicmotions",), archs=("small_cnn1d",))
    result = CliRunner().invoke(main, ["run", "--grid", str(grid), "--results", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "warning: basicmotions/small_cnn1d: batch size 64 exceeds" in result.stderr


def test_a_missing_dataset_is_named_once_not_once_per_cell(tmp_path):
    """The full grid without its data printed "not present under ..." 7 times per dataset (21 lines; issue 22)."""
    grid = load_grid("full", check_models=False)
    missing = [w for w in cell_warnings(grid.specs, tmp_path) if "not present under" in w]
    datasets = sorted({s.dataset for s in grid.specs})
    assert len({s.arch for s in grid.specs}) > 1
    assert sorted(w.split(":")[0] for w in missing) == datasets
