"""netsim_paper.report: metrics JSON writer and the generated README results table."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from netsim_paper import report

README = f"""# netsim

## Results

{report.START}
old table
{report.END}

## Data
"""


@pytest.fixture
def figdir(tmp_path, monkeypatch):
    path = tmp_path / "figures"
    monkeypatch.setenv("NETSIM_FIGURES_DIR", str(path))
    return path


def test_write_metrics_content(figdir):
    path = report.write_metrics("02_demo", {
        "slope": np.float32(-0.5), "count": np.int64(3), "curve": np.arange(3.0),
        "t": torch.tensor([1.5, 2.5]), "t0": torch.tensor(7), "flag": np.bool_(True),
        "nested": {"a": [1, 2.5]},
    }, profile="smoke", seeds=0)
    assert path == figdir / "02_demo.json"
    data = json.loads(path.read_text())
    assert data["slope"] == -0.5 and data["count"] == 3 and data["curve"] == [0.0, 1.0, 2.0]
    assert data["t"] == [1.5, 2.5] and data["t0"] == 7 and data["flag"] is True
    assert data["nested"] == {"a": [1, 2.5]}
    assert data["profile"] == "smoke" and data["seeds"] == [0]
    assert set(data["package_versions"]) == {"python", "torch", "numpy", "matplotlib", "netsim"}
    assert data["package_versions"]["torch"].startswith("2.13.0")
    assert data["numeric_setting"]["torch_threads"] >= 1 and data["numeric_setting"]["cpu_capability"]
    assert data["generated_at"].endswith("+00:00")
    assert path.read_text().startswith("{\n  ")  # pretty-printed


@pytest.mark.parametrize("metrics, where", [
    ({"a": float("nan")}, "metrics['a']"),
    ({"a": {"b": [1.0, float("inf")]}}, "metrics['a']['b'][1]"),
    ({"curve": np.array([0.0, np.nan])}, "metrics['curve'][1]"),
    ({"t": torch.tensor([[1.0], [float("-inf")]])}, "metrics['t'][1][0]"),
    ({"x": np.float64("nan")}, "metrics['x']"),
])
def test_write_metrics_rejects_non_finite_naming_the_key_path(figdir, metrics, where):
    with pytest.raises(ValueError) as err:
        report.write_metrics("02_demo", metrics, profile="paper", seeds=[0])
    assert where in str(err.value)
    assert not figdir.exists() or list(figdir.iterdir()) == []  # nothing written, not even a temp


def test_failed_write_keeps_previous_file(figdir):
    good = report.write_metrics("02_demo", {"a": 1.0}, profile="paper", seeds=[0, 1])
    before = good.read_text()
    with pytest.raises(ValueError):
        report.write_metrics("02_demo", {"a": float("nan")}, profile="paper", seeds=[0])
    assert good.read_text() == before
    assert sorted(p.name for p in figdir.iterdir()) == ["02_demo.json"]


def test_write_is_atomic(figdir, monkeypatch):
    """A crash between writing and renaming leaves the old file and no temp file behind."""
    good = report.write_metrics("02_demo", {"a": 1.0}, profile="paper", seeds=[0])
    before = good.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        report.write_metrics("02_demo", {"a": 2.0}, profile="paper", seeds=[0])
    assert good.read_text() == before
    assert os.listdir(figdir) == ["02_demo.json"]


@pytest.mark.parametrize("metrics", [{"profile": "x"}, {"seeds": [1]}, {"o": object()}])
def test_write_metrics_rejects_reserved_keys_and_unknown_types(figdir, metrics):
    with pytest.raises((ValueError, TypeError)):
        report.write_metrics("02_demo", metrics, profile="paper", seeds=[0])


def test_write_metrics_rejects_bad_stem_and_profile(figdir):
    for stem in ("a/b", "x.json", ""):
        with pytest.raises(ValueError):
            report.write_metrics(stem, {}, profile="paper", seeds=[0])
    with pytest.raises(ValueError, match="smoke, paper"):
        report.write_metrics("02_demo", {}, profile="full", seeds=[0])


def test_update_readme_replaces_between_markers(tmp_path, figdir):
    report.write_metrics("02_demo", {
        "title": "Sinusoid",
        "readme_rows": [{"quantity": "slope of N_S", "ours": -0.3512345, "paper": "-1"}],
        "slope": -0.35,
    }, profile="paper", seeds=[0, 1])
    report.write_metrics("01_align", {"median_px": 1.25, "rounds": 3, "ok": True,
                                      "curve": [1.0, 2.0]}, profile="paper", seeds=0)
    (figdir / "notes.json").write_text("{}")  # not a notebook's metrics: ignored
    readme = tmp_path / "README.md"
    readme.write_text(README)

    report.update_readme(readme, figdir)
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("# netsim\n\n## Results\n\n") and text.endswith("\n\n## Data\n")
    body = text[text.index(report.START):text.index(report.END)]
    # the README: each notebook's first row (neither is in HEADLINES), linked to its notebook
    assert body.index("| [01](figures/notebooks/01_align.ipynb) | median_px | 1.25 | — |") \
        < body.index("| [02](figures/notebooks/02_demo.ipynb) | slope of N_S | -0.3512 | -1 |")
    assert "| rounds |" not in body and "notes" not in body
    assert "[`figures/RESULTS.md`](figures/RESULTS.md)" in body
    # figures/RESULTS.md: every row, readme_rows over scalars, only numeric scalars
    page = (figdir / "RESULTS.md").read_text()
    assert page.index("### [01_align](notebooks/01_align.ipynb)\n") \
        < page.index("### [02_demo](notebooks/02_demo.ipynb) — Sinusoid\n")
    assert "| slope of N_S | -0.3512 | -1 |" in page and "| slope |" not in page
    assert "| median_px | 1.25 | — |" in page and "| rounds | 3 | — |" in page
    assert "| ok |" not in page and "| curve |" not in page and "notes" not in page
    assert "profile `paper`, seeds 0, 1," in page

    report.update_readme(readme, figdir)  # idempotent
    assert readme.read_text() == text


def test_headline_rows_are_picked_by_quantity(tmp_path, figdir, monkeypatch):
    rows = [{"quantity": q, "ours": i, "paper": "p"} for i, q in enumerate(["size", "slope of N_S", "time"])]
    report.write_metrics("02_demo", {"readme_rows": rows}, profile="paper", seeds=[0])
    readme = tmp_path / "README.md"
    readme.write_text(README)
    monkeypatch.setitem(report.HEADLINES, "02_demo", ("time", "slope"))
    report.update_readme(readme, figdir)
    body = readme.read_text().split(report.START)[1]
    assert body.index("| time | 2 |") < body.index("| slope of N_S | 1 |") and "| size |" not in body
    monkeypatch.setitem(report.HEADLINES, "02_demo", ("accuracy",))  # a renamed row is named, not skipped
    with pytest.raises(ValueError, match="02_demo.json has 0 rows starting 'accuracy'"):
        report.update_readme(readme, figdir)


def test_update_readme_without_results(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    report.update_readme(readme, tmp_path / "empty")
    assert f"{report.START}\nNo results yet: run ./run_all.sh\n{report.END}" in readme.read_text()


@pytest.mark.parametrize("text", [
    "# no markers\n",
    f"{report.START}\nonly start\n",
    f"{report.END}\n{report.START}\n",
    f"{report.START}\n{report.END}\n{report.START}\n{report.END}\n",
])
def test_update_readme_requires_markers(tmp_path, text):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(ValueError, match="results:start"):
        report.update_readme(readme, tmp_path)
    assert readme.read_text() == text


def test_cli_update_readme(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert report.main(["update-readme", "--readme", str(readme), "--figures", str(tmp_path)]) == 0
    assert "No results yet" in readme.read_text()
    readme.write_text("no markers")
    assert report.main(["update-readme", "--readme", str(readme), "--figures", str(tmp_path)]) == 1
    assert "results:start" in capsys.readouterr().err


def test_update_readme_defaults_beside_the_readme(tmp_path):
    """Without paths, figures/ and bench/ are read beside the README (a test never touches the repo's)."""
    readme = tmp_path / "README.md"
    readme.write_text(README)
    report.update_readme(readme)
    assert "No results yet" in readme.read_text() and not (tmp_path / "bench").exists()


CONTROL = {"noise_factor": 1.5, "noise_median_px": 11.036, "heldout_noise_median_px": 10.78,
           "rounds": [{"round": 1, "median_px": 6.3, "heldout_median_px": 6.25},
                      {"round": 2, "median_px": 3.438, "heldout_median_px": 3.777}]}


def test_paper_regime_line_from_the_control(tmp_path, figdir, monkeypatch):
    monkeypatch.delitem(report.HEADLINES, "01_alignment_cdf")  # these metrics have only the control
    readme = tmp_path / "README.md"
    readme.write_text(README + f"The paper's regime: {report.REGIME_START}old{report.REGIME_END}.\n")
    report.update_readme(readme, figdir)  # no metrics yet: the line is left alone
    assert f"{report.REGIME_START}old{report.REGIME_END}" in readme.read_text()
    report.write_metrics("01_alignment_cdf", {"control": CONTROL}, profile="paper", seeds=0)
    report.update_readme(readme, figdir)
    line = ("noise ×1.5, median error (px) of the noisy labels → rounds 1–2: 11.04 → 6.30 → 3.44 "
            "(held-out tiles: 10.78 → 3.78 px) — from `figures/01_alignment_cdf.json`")
    assert f"{report.REGIME_START}\n{line}\n{report.REGIME_END}." in readme.read_text()
    one_round = dict(CONTROL, rounds=CONTROL["rounds"][:1], heldout_noise_median_px=None)
    report.write_metrics("01_alignment_cdf", {"control": one_round}, profile="paper", seeds=0)
    assert report.paper_regime_markdown(figdir).startswith("noise ×1.5, median error (px) of the noisy labels "
                                                           "→ round 1: 11.04 → 6.30 — from")
    report.write_metrics("01_alignment_cdf", {"control": dict(CONTROL, rounds=[])}, profile="paper", seeds=0)
    assert report.paper_regime_markdown(figdir) is None


def _index_results(**over):
    res = {"n": 50000, "pool": 5000, "default_sketch": 1024, "build_d1_x_epoch": 1.4, "build_d10_x_epoch": 31.0,
           "query100_x_epoch": 0.05, "disk_d1_bytes": 2.0e8, "disk_exact_d1_bytes_projected": 1.07e10,
           "values_per_sample_exact": 53645, "values_per_sample_sketch": 1022, "test_accuracy_200": 0.98,
           "epoch_s": 70.0,
           "accuracy": [{"k": 512, "recall_at_10": 0.91, "median_abs_err": 0.013, "p99_abs_err": 0.05},
                        {"k": 1024, "recall_at_10": 0.89, "median_abs_err": 0.006, "p99_abs_err": 0.025}]}
    res.update(over)
    return res


def test_index_section_reports_each_goal_as_measured(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "index_results.json").write_text(json.dumps(_index_results()))
    readme = tmp_path / "README.md"
    readme.write_text(README + "\n<!-- index:start -->\nold\n<!-- index:end -->\n")
    report.update_readme(readme)
    text = readme.read_text()
    assert "old" not in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| build, d = 1 (`class_vs_rest`), sketch 1024, × epoch"].endswith("| 1.40 | ≤ 3 | yes |")
    assert rows["| build, d = 10 (`neg_log_softmax`), sketch 1024, × epoch"].endswith("| 31.00 | ≤ 30 | no |")
    recall = next(line for key, line in rows.items() if key.startswith("| top-10 recall"))
    assert recall.endswith("| 0.890 | ≥ 0.9 | no |")                       # the default size's row, not the best
    assert "| 200 MB | ≤ 1 GB | yes |" in text and "10.7 GB for 50k images" in text
