"""netsim_paper.runner (the engine of run_all.sh): publish-on-success, stop-and-name-on-failure,
messages that name the real cause, executed notebooks published in the paper profile.

Runs tiny notebooks through papermill with the `python3` kernel of .venv (a few seconds each).
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


def test_a_malformed_source_notebook_is_named_as_such(project, capsys):
    nbs = project / "notebooks"
    (nbs / "04_broken.ipynb").write_text('{"cells": [ not json')
    status = runner.main(_args(project, "04_broken"))
    err = capsys.readouterr().err
    assert status == 1
    assert f"the source notebook {nbs / '04_broken.ipynb'} is malformed" in err
    assert "NotJSONError" in err or "JSONDecodeError" in err
    assert "no executed copy was written" in err and "executed copy with its outputs" not in err
    assert not (project / "build" / "notebooks" / "smoke" / "04_broken.ipynb").exists()


def test_a_schema_invalid_notebook_is_malformed_too(tmp_path):
    path = tmp_path / "05_schema.ipynb"
    path.write_text('{"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [{"cell_type": "code"}]}')
    failure = runner.check_source(path)
    assert failure is not None and f"the source notebook {path} is malformed" in failure.describe()
    assert runner.check_source(_notebook(tmp_path / "06_fine.ipynb", "x = 1")) is None


def test_a_dead_kernel_is_named_with_its_exit_code_and_last_started_cell(project, capsys):
    nbs = project / "notebooks"
    _notebook(nbs / "04_dies.ipynb", "x = 1", "import os\nos._exit(3)", "never = True")
    status = runner.main(_args(project, "04_dies"))
    err = capsys.readouterr().err
    assert status == 1
    assert "the kernel died (exit code 3) while running cell 2 (0-based, the last cell that started)" in err
    assert "cell starts with: import os" in err and "unknown cell" not in err


def test_paper_profile_publishes_slim_executed_notebooks_on_success_only(project, capsys):
    nbs = project / "notebooks"
    spam = ('import sys\nfor i in range(100):\n    print("line", i, file=sys.stderr)\n'
            'for i in range(300):\n    sys.stderr.write(f"\\rstep {i}")\nsys.stderr.write("\\n")\nprint("result 42")')
    _notebook(nbs / "01_pass.ipynb", WRITE.format(name="01_pass.png"), spam)
    published = project / "figures" / "notebooks"
    published.mkdir()
    (published / "02_fail.ipynb").write_text("old")
    args = _args(project, "01_pass", "02_fail")
    args[1] = "paper"

    assert runner.main(args) == 1
    out = capsys.readouterr().out
    assert f"executed notebook -> {published / '01_pass.ipynb'}" in out
    nb = nbformat.read(published / "01_pass.ipynb", as_version=4)
    nbformat.validate(nb)
    streams = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "stream"]
    stderr = "".join(o.text for o in streams if o.name == "stderr")
    assert "step 299" in stderr and "step 298" not in stderr and "\r" not in stderr  # redraws: final state only
    assert "line 99" in stderr and "line 0\n" not in stderr and "earlier stderr lines dropped" in stderr
    assert "result 42" in "".join(o.text for o in streams if o.name == "stdout")
    assert "input_path" not in nb.metadata.papermill
    assert (published / "02_fail.ipynb").read_text() == "old"  # a failed notebook keeps its old copy
    executed = project / "build" / "notebooks" / "paper" / "01_pass.ipynb"
    full = nbformat.read(executed, as_version=4)  # build/ keeps every line
    assert "line 0\n" in "".join(o.get("text", "") for c in full.cells for o in c.get("outputs", []))

    before = (published / "01_pass.ipynb").read_bytes()
    status = runner.run([nbs / "03_never.ipynb"], profile="paper", figures_dir=project / "figures",
                        build_dir=project / "build", max_published_bytes=100)
    err = capsys.readouterr().err
    assert status == 1 and "over the 0.0 MB limit" in err
    assert not (published / "03_never.ipynb").exists() and not (project / "figures" / "03_never.png").exists()
    assert (published / "01_pass.ipynb").read_bytes() == before


def test_smoke_profile_publishes_no_notebook(project):
    assert runner.main(_args(project, "01_pass")) == 0
    assert not (project / "figures" / "notebooks").exists()


def test_slim_notebook_drops_widgets_and_keeps_the_rest():
    widget = nbformat.v4.new_output("display_data", data={
        runner.WIDGET_MIME: {"model_id": "abc"}, "text/plain": "  0%|          | 0/10"})
    image = nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="})
    nb = new_notebook(cells=[new_code_cell("x", outputs=[widget, image])],
                      metadata={"widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}}})
    slim = runner.slim_notebook(nb)
    assert "widgets" not in slim["metadata"] and slim["cells"][0]["outputs"] == [image]
    assert nb.cells[0].outputs == [widget, image]  # the input is left alone


def test_a_kernel_killed_by_a_signal_before_any_cell(tmp_path):
    message = runner._kernel_died(tmp_path / "never_written.ipynb", [None, -9]).describe()
    assert message == "the kernel died (killed by signal 9) before any cell started"
    assert "exit code unknown" in runner._kernel_died(tmp_path / "never_written.ipynb", []).describe()
