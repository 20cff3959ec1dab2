"""Grid files: every shipped grid parses; every mistake names the file and the offending key."""
import pytest

from benchmark.errors import UserError
from benchmark.grid import grid_names, load_grid, parse_filters, select


@pytest.mark.xdist_group("full_grid")   # beside tests/test_full_grid.py: the full grid's meta-device profiles are
@pytest.mark.parametrize("name", grid_names())   # cached per process (~4 s of CPU), so one worker builds them once
def test_shipped_grids_parse(name):
    grid = load_grid(name)
    assert grid.specs and len({s.run_id for s in grid.specs}) == len(grid.specs)


def test_required_grids_exist():
    assert {"smoke", "quick", "full"} <= set(grid_names())


def test_run_ids_are_stable_and_semantic(grid_file):
    a = load_grid(str(grid_file("a.toml")))
    b = load_grid(str(grid_file("b.toml")))          # same content, another path
    assert [s.run_id for s in a.specs] == [s.run_id for s in b.specs]
    c = load_grid(str(grid_file("c.toml", epochs=3)))
    assert not {s.run_id for s in a.specs} & {s.run_id for s in c.specs}


def test_p1_is_shared_by_disjoint_and_mixed_only_at_the_same_budget(grid_file):
    specs = {s.regime: s for s in load_grid(str(grid_file(epochs=4))).specs}
    assert specs["disjoint"].p1_id(2, "cpu") == specs["mixed"].p1_id(2, "cpu")
    assert specs["disjoint"].p1_id(2, "cpu") != specs["mixed"].p1_id(3, "cpu")
    assert specs["disjoint"].pairing_seed == specs["joint"].pairing_seed


@pytest.mark.parametrize("change, expected", [
    (dict(datasets=("cifar11",)), "unknown name 'cifar11'"),
    (dict(archs=("resnet1000",)), "unknown name 'resnet1000'"),
    (dict(regimes=("mixd",)), "unknown name 'mixd'"),
    (dict(epochs=0), "train.epochs"),
    (dict(extra="[train.x]\n"), "train"),
    (dict(extra="[hparams.uniform]\nweight = 2\n"), "hparams.uniform.weight"),
    (dict(extra="[hparams.nosuch]\na = 1\n"), "hparams.nosuch"),
    (dict(extra="[arch_overrides.resnet18]\nlr = 0.1\n"), "arch_overrides.resnet18"),
])
def test_bad_grid_names_the_file_and_key(grid_file, change, expected):
    path = grid_file(**change)
    with pytest.raises(UserError) as error:
        load_grid(str(path))
    assert expected in str(error.value) and str(path) in str(error.value)


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('datasets=["digits"]\narchs=["small_cnn"]\nregimes=["joint"]\nseeds=[0]\n'
                    '[train]\nepochs=2\nbatchsize=32\n')
    with pytest.raises(UserError, match="did you mean 'batch_size'"):
        load_grid(str(path))


def test_malformed_toml_reports_the_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('datasets = ["digits"]\narchs = ["small_cnn"\nseeds = [0]\n')
    with pytest.raises(UserError, match=r"not valid TOML.*line"):
        load_grid(str(path))


def test_unknown_grid_name_lists_the_valid_ones():
    with pytest.raises(UserError, match="Valid grids: .*quick"):
        load_grid("quik")


def test_filters_select_by_glob(grid_file):
    specs = load_grid(str(grid_file(seeds=(0, 1)))).specs
    chosen = select(specs, parse_filters(("regime=[dm]*", "seed=1")))   # disjoint, mixed
    assert sorted(s.regime for s in chosen) == ["disjoint", "mixed"] and {s.seed for s in chosen} == {1}
    both = select(specs, parse_filters(("regime=joint", "regime=mixed")))
    assert sorted({s.regime for s in both}) == ["joint", "mixed"]
    with pytest.raises(UserError, match="KEY=GLOB"):
        parse_filters(("colour=red",))


def test_datasets_pair_only_with_archs_of_their_input_kind(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('datasets=["digits"]\noptional_datasets=["basicmotions"]\narchs=["small_cnn", "small_cnn1d"]\n'
                    'regimes=["joint"]\nseeds=[0]\n[train]\nepochs=2\n')
    from benchmark.data import dataset_available
    pairs = {(s.dataset, s.arch) for s in load_grid(str(path)).specs}
    expected = {("digits", "small_cnn")} | ({("basicmotions", "small_cnn1d")} if dataset_available("basicmotions") else set())
    assert pairs == expected


def test_a_dataset_no_arch_can_take_is_an_error(grid_file):
    path = grid_file(archs=("small_cnn1d",))
    with pytest.raises(UserError, match="'digits' holds image inputs but no arch"):
        load_grid(str(path))


def test_regime_overrides_change_only_the_matching_regimes(grid_file):
    path = grid_file(regimes=("joint", "mixed", "mixed+sdn"), extra='[regime_overrides."mixed*"]\nlr = 0.01\n')
    specs = {s.regime: s for s in load_grid(str(path)).specs}
    assert {r: s.own_phase_train["lr"] for r, s in specs.items()} == {"joint": 0.05, "mixed": 0.01, "mixed+sdn": 0.01}
    assert specs["mixed"].p1_id(1, "cpu") == specs["mixed+sdn"].p1_id(1, "cpu"), "the shared P1 ignores regime overrides"
    for key, value in (("epochs", "4"), ("batch_size", "32"), ("eval_every", "2"), ("p1_epochs", "1")):
        path = grid_file("c.toml", regimes=("joint", "mixed"), extra=f'[regime_overrides."mixed"]\n{key} = {value}\n')
        with pytest.raises(UserError, match=f"regime_overrides.mixed.{key}'.*would break pairing"):
            load_grid(str(path))
    with pytest.raises(UserError, match="matches none"):
        load_grid(str(grid_file("b.toml", extra='[regime_overrides."*+l2w"]\nlr = 0.01\n')))


def test_excluded_cells_are_left_out(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('datasets = ["digits", "mnist5k"]\narchs = ["small_cnn", "cifar_resnet8"]\nregimes = ["joint"]\n'
                    'seeds = [0]\nexclude = [{dataset = "mnist5k", arch = "cifar_resnet8"}]\n[train]\nepochs = 2\n')
    cells = {(s.dataset, s.arch) for s in load_grid(str(path)).specs}
    assert cells == {("digits", "small_cnn"), ("digits", "cifar_resnet8"), ("mnist5k", "small_cnn")}


def test_p1_backbones_are_not_shared_across_device_types(grid_file):
    spec = load_grid(str(grid_file())).specs[0]
    assert spec.p1_id(1, "cpu") != spec.p1_id(1, "cuda"), "a bf16 GPU backbone must not serve a float32 CPU run"


def test_cell_overrides_set_per_cell_batch_size_and_budget(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('datasets = ["digits", "mnist5k"]\narchs = ["small_cnn"]\nregimes = ["joint", "mixed"]\n'
                    'seeds = [0]\n[train]\nepochs = 4\n[cell_overrides."mnist5k/*"]\nbatch_size = 32\nepochs = 6\n')
    train = {(s.dataset, s.regime): (s.train["batch_size"], s.train["epochs"]) for s in load_grid(str(path)).specs}
    assert train == {("digits", "joint"): (128, 4), ("digits", "mixed"): (128, 4),
                     ("mnist5k", "joint"): (32, 6), ("mnist5k", "mixed"): (32, 6)}
    path.write_text(path.read_text().replace("mnist5k/*", "cifar10/*"))
    with pytest.raises(UserError, match="cell_overrides.cifar10/\\*'.*matches no"):
        load_grid(str(path))


@pytest.mark.parametrize("table, problem", [
    ("[tuning]\nseeds = [0]\nlr = [0.1]\n", "tuning.seeds'.*also reported seeds"),
    ("[tuning]\nseeds = [9]\nlr = []\n", "tuning.lr'.*non-empty list"),
    ("[tuning]\nseeds = [9]\nlr = [0.1, -1]\n", "tuning.lr'"),
    ("[tuning]\nseeds = [9]\nlr = [0.1]\nrate = 2\n", "tuning.rate'.*unknown key"),
    ("[tuning]\nseeds = [9]\nlr = [0.1]\n[tuning.hparams.sdn]\nfoo = [1]\n", "tuning.hparams.sdn.foo'"),
    ("[tuning]\nseeds = [9]\nlr = [0.1]\n[tuning.hparams.distill]\nc = [0.5]\nT = [4.0]\n", "at most one knob"),
    ('[tuning]\nseeds = [9]\nlr = [0.1]\n[regime_overrides."mixed"]\nlr = 0.2\n', "lr is tuned"),
])
def test_tuning_tables_are_validated(grid_file, table, problem):
    with pytest.raises(UserError, match=problem):
        load_grid(str(grid_file(regimes=("joint", "mixed"), extra=table)))


def test_a_folder_named_like_a_grid_is_not_taken_for_a_grid_file(tmp_path, monkeypatch):
    (tmp_path / "smoke").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_grid("smoke").name == "smoke"
