"""netsim_paper.plotting: figure directory resolution and savefig."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from netsim_paper import plotting  # noqa: E402


@pytest.fixture
def fig():
    figure, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    yield figure
    plt.close(figure)


def test_savefig_writes_png_and_pdf_into_env_dir(tmp_path, monkeypatch, fig):
    monkeypatch.setenv("NETSIM_FIGURES_DIR", str(tmp_path / "stage"))
    paths = plotting.savefig(fig, "02_demo")
    assert paths == [tmp_path / "stage" / "02_demo.png", tmp_path / "stage" / "02_demo.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"


def test_savefig_pdf_is_reproducible(tmp_path, monkeypatch, fig):
    monkeypatch.setenv("NETSIM_FIGURES_DIR", str(tmp_path))
    first = plotting.savefig(fig, "a")[1].read_bytes()
    second = plotting.savefig(fig, "b")[1].read_bytes()
    assert first == second  # no creation date: committed PDFs only change with the plot


def test_figures_dir_by_profile(monkeypatch):
    monkeypatch.delenv("NETSIM_FIGURES_DIR", raising=False)
    root = plotting.repo_root() / "figures"
    assert plotting.profile_figures_dir("paper") == root
    assert plotting.profile_figures_dir("smoke") == root / "smoke"
    monkeypatch.setenv("NETSIM_PROFILE", "smoke")
    assert plotting.profile_figures_dir() == root / "smoke"
    assert plotting.profile_figures_dir("paper") == root  # explicit argument wins
    monkeypatch.delenv("NETSIM_PROFILE")
    assert plotting.current_profile() == "paper"
    with pytest.raises(ValueError, match="smoke, paper"):
        plotting.current_profile("fast")


def test_env_dir_wins_over_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("NETSIM_FIGURES_DIR", str(tmp_path / "x"))
    assert plotting.figures_dir("paper") == tmp_path / "x"
    assert (tmp_path / "x").is_dir()


@pytest.mark.parametrize("name", ["", "sub/name", "name.png", "..", "name.pdf"])
def test_savefig_rejects_bad_names(tmp_path, monkeypatch, fig, name):
    monkeypatch.setenv("NETSIM_FIGURES_DIR", str(tmp_path))
    with pytest.raises(ValueError):
        plotting.savefig(fig, name)
    assert list(tmp_path.iterdir()) == []


def test_use_style_sets_constrained_layout():
    with matplotlib.rc_context():  # restore the global style for the other tests
        plotting.use_style()
        assert matplotlib.rcParams["figure.constrained_layout.use"] is True
        assert matplotlib.rcParams["savefig.dpi"] == plotting.DPI
