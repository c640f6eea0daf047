"""What the paper reports for the sinusoid task (section 4.3, Fig. 4), each with where it was read.

Fig. 4 plots neighbour counts against the frequency f without numbers to digitise; the paper's
claim about it is in the text, so the values here are that claim.
"""

from __future__ import annotations

#: Log-log slope of every neighbour count against f. Section 4.3, lines 170-171: "When the
#: frequency f of the sinusoid to predict increases, the number of neighbors decreases in 1/f
#: for every estimator".
COUNT_SLOPE: float = -1.0

#: How the text words that slope (same lines), quoted in the README table.
COUNT_SLOPE_WORDS: str = "in 1/f"

#: Which estimators fall with f: "for every estimator" (same lines).
ESTIMATORS_FALLING: str = "all"
