"""README's examples run as written: every code block after an `<!-- example: NAME -->` marker, in order, in an empty
folder — Python blocks in one namespace, bash blocks one `bench` command per line through the CLI, TOML blocks
written to the file their first comment line names."""
import re
import shlex

import matplotlib
import pandas as pd
import pytest
from click.testing import CliRunner

from benchmark.cli import main
from conftest import REPO, SERIAL_RUN, THREADS

matplotlib.use("Agg")

EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```(python|bash|toml)\n(.*?)```", re.S)
EXPECTED = {"api", "external", "pretrained"}
"""The examples README must show (issue 24: the API, a model trained elsewhere, pretrained weights with a tracker):
a test that finds fewer fails rather than passes on nothing."""


def readme_examples() -> list[tuple[str, str, str]]:
    return EXAMPLE.findall((REPO / "README.md").read_text())


@pytest.mark.slow
def test_readme_examples_run_as_written(tmp_path, monkeypatch):
    examples = readme_examples()
    assert {name for name, _, _ in examples} >= EXPECTED
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for name, language, code in examples:
        if language == "toml":                         # a file: its first line is a comment naming it
            filename = code.splitlines()[0].removeprefix("#").strip()
            (tmp_path / filename).write_text(code)
            continue
        if language == "python":
            exec(compile(code, f"README.md example '{name}'", "exec"), namespace)
            continue
        for line in code.splitlines():
            command = line.split("#", 1)[0].strip()
            if not command:
                continue
            assert command.startswith("bench "), f"example '{name}': only bench commands run here, not {command!r}"
            args = shlex.split(command)[1:]
            if args[0] == "run":            # this worker's share of the cores (conftest.py, THREADS)
                args += ["--threads", str(THREADS)] if "--executor" in args else SERIAL_RUN
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, (name, command, result.output)
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert namespace["runs"].auc_normalised.between(0.3, 1.0).all()          # the networks learned something
    report = (tmp_path / "results" / "external" / "REPORT.md").read_text()
    assert "external-my_cnn-s2" in report and "a notebook: benchmark.api.train_model" in report
    runs = pd.read_csv(tmp_path / "results" / "pretrained" / "tables" / "runs.csv")
    assert len(runs) == 3 and runs.weights.str.startswith("sha256:").all() and (runs.status == "done").all()
    logged = {p.parent.name for p in (tmp_path / "results" / "pretrained" / "tensorboard").glob("*/events.out.*")}
    assert logged == set(runs.run_id)
