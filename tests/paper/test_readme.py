"""README.md: the library example runs as written, the generated sections are up to date, and the
page stays short enough to read in five minutes."""

import json
import re
import shutil
from pathlib import Path

from netsim_paper import report

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: "A README a newcomer reads in five minutes" (issue 11): about 250 lines.
MAX_LINES = 250


def test_readme_example_runs():
    text = README.read_text()
    block = re.search(r"<!-- readme-example:start -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its example markers"
    exec(compile(block.group(1), "README.md example", "exec"), {})


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= MAX_LINES


def test_generated_sections_are_up_to_date(tmp_path):
    """What `update-readme` would write from the committed figures/*.json, bench/results.json and
    bench/index_results.json is what README.md, figures/RESULTS.md and bench/RESULTS.md hold:
    nobody edited the numbers by hand."""
    readme = tmp_path / "README.md"
    shutil.copy(README, readme)
    for sub, pattern in (("figures", "[0-9][0-9]_*.json"), ("bench", "*results.json")):
        (tmp_path / sub).mkdir()
        for path in (ROOT / sub).glob(pattern):
            shutil.copy(path, tmp_path / sub / path.name)
    report.update_readme(readme)
    hint = "run: python -m netsim_paper.report update-readme"
    assert readme.read_text() == README.read_text(), hint
    for page in ("figures/RESULTS.md", "bench/RESULTS.md"):
        assert (tmp_path / page).read_text() == (ROOT / page).read_text(), hint
    for start, end in ((report.START, report.END), (report.REGIME_START, report.REGIME_END),
                       (report.PERF_START, report.PERF_END)):
        body = README.read_text().split(start)[1].split(end)[0]
        assert body.strip(), f"nothing generated between {start} and {end}"


def test_narrative_links_every_figure_to_its_executed_notebook():
    narrative = README.read_text().split(report.START)[0]
    figures = [p.stem for p in sorted((ROOT / "figures").glob("[0-9][0-9]_*.json"))
               if str(json.loads(p.read_text()).get("title", "")).startswith("Fig")]
    assert len(figures) == 5
    for stem in figures:
        assert f"](figures/notebooks/{stem}.ipynb)" in narrative, stem
