"""netsim_paper.runner (the engine of run_all.sh): publish-on-success, stop-and-name-on-failure.

Runs two tiny notebooks through papermill with the `python3` kernel of .venv (a few seconds).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from netsim_paper import runner

PARAMS = 'profile = "paper"\nseed = 1'
WRITE = ('import os, pathlib\n'
         'out = pathlib.Path(os.environ["NETSIM_FIGURES_DIR"])\n'
         '(out / "{name}").write_text(f"{{profile}} {{seed}} {{os.environ[\'NETSIM_PROFILE\']}}")')


def _notebook(path: Path, *sources: str) -> Path:
    cells = [new_code_cell(PARAMS, metadata={"tags": ["parameters"]})]
    cells += [new_code_cell(src) for src in sources]
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nbformat.write(nb, path)
    return path


@pytest.fixture
def project(tmp_path):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    _notebook(nbs / "01_pass.ipynb", WRITE.format(name="01_pass.png"))
    _notebook(nbs / "02_fail.ipynb", WRITE.format(name="02_fail.png"), "x = 1\n1 / 0")
    _notebook(nbs / "03_never.ipynb", WRITE.format(name="03_never.png"))
    (nbs / "scratch.ipynb").write_text("not a numbered notebook, never run")
    figures = tmp_path / "figures"
    figures.mkdir()
    for name, text in [("01_pass.png", "old"), ("02_fail.png", "old"), ("keep.pdf", "keep")]:
        (figures / name).write_text(text)
    return tmp_path


def _args(root: Path, *extra: str) -> list[str]:
    return ["--profile", "smoke", "--notebooks-dir", str(root / "notebooks"),
            "--figures-dir", str(root / "figures"), "--build-dir", str(root / "build"), *extra]


def test_failure_stops_names_cell_and_keeps_figures(project, capsys):
    status = runner.main(_args(project))
    out, err = capsys.readouterr()
    figures = project / "figures"

    assert status == 1
    # the passing notebook ran with the injected parameters and its figure was published
    assert (figures / "01_pass.png").read_text() == "smoke 0 smoke"
    assert "[1/3] ok 01_pass.ipynb" in out
    # the failing one is named with its cell (index in the source notebook: 0 parameters,
    # 1 writes, 2 raises), and nothing it staged reached figures/
    assert "FAILED" in err and "02_fail.ipynb" in err
    assert "cell 2 (0-based)" in err and "ZeroDivisionError" in err
    assert (figures / "02_fail.png").read_text() == "old"
    assert (figures / "keep.pdf").read_text() == "keep"
    assert sorted(p.name for p in figures.iterdir()) == ["01_pass.png", "02_fail.png", "keep.pdf"]
    # it stopped there; staging is cleaned; executed copies are kept for inspection
    assert "03_never" not in out + err.replace("remaining notebooks not run", "")
    assert list((project / "build" / "staging").iterdir()) == []
    executed = project / "build" / "notebooks" / "smoke"
    assert sorted(p.name for p in executed.iterdir()) == ["01_pass.ipynb", "02_fail.ipynb"]


def test_named_notebooks_by_stem_and_path(project):
    nbs = project / "notebooks"
    assert runner.find_notebooks([], nbs) == [nbs / "01_pass.ipynb", nbs / "02_fail.ipynb",
                                              nbs / "03_never.ipynb"]
    assert runner.find_notebooks(["03_never", str(nbs / "01_pass.ipynb"), "02_fail.ipynb"], nbs) == [
        nbs / "03_never.ipynb", nbs / "01_pass.ipynb", nbs / "02_fail.ipynb"]
    with pytest.raises(runner.NotebookNotFound, match="01_pass, 02_fail, 03_never"):
        runner.find_notebooks(["04_missing"], nbs)


def test_cli_unknown_notebook_exits_2(project):
    proc = subprocess.run([sys.executable, "-m", "netsim_paper.runner", *_args(project), "04_missing"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no notebook '04_missing'" in proc.stderr


def test_first_error_maps_past_injected_parameters(tmp_path):
    nb = new_notebook(cells=[
        new_code_cell("profile = 'paper'", metadata={"tags": ["parameters"]}),
        new_code_cell("profile = 'smoke'", metadata={"tags": ["injected-parameters"]}),
        new_code_cell("ok = 1", execution_count=1),
        new_code_cell("raise KeyError('k')", execution_count=2, outputs=[nbformat.v4.new_output(
            "error", ename="KeyError", evalue="'k'", traceback=[])]),
    ])
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    failure = runner.first_error(path)
    assert (failure.index, failure.exec_count, failure.ename) == (2, 2, "KeyError")
    assert "cell 2 (0-based), In [2] of the executed copy: KeyError: 'k'" in failure.describe()
    assert runner.first_error(tmp_path / "missing.ipynb") is None
