"""netsim_paper.sinusoid.paper: the paper's claim on Fig. 4 is stored once, as a slope and the
words the README quotes."""

from pathlib import Path

from netsim_paper.sinusoid import paper

README = Path(__file__).resolve().parents[2] / "README.md"


def test_in_one_over_f_is_a_log_log_slope_of_minus_one_and_the_readme_quotes_it():
    assert (paper.COUNT_SLOPE_WORDS, paper.COUNT_SLOPE, paper.ESTIMATORS_FALLING) == ("in 1/f", -1.0, "all")
    assert f'"{paper.COUNT_SLOPE_WORDS}"' in README.read_text()
