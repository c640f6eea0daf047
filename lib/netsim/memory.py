"""How much memory a call may hold: one budget, one knob.

Every function that holds more than one chunk of Jacobians at a time -- `similarity`'s row blocks and
kernel blocks (and those of `similarity_blocks`, `neighbour_counts`, `similarity_by_module` and the
diagnostics), `soft_density`'s kept first pass, a `SimilarityIndex`'s query blocks -- sizes them to a
budget of bytes held beyond the model, one chunk's working set and the result it returns. The budget
is the call's `memory_budget=` argument, else the environment variable NETSIM_MEMORY_BUDGET, else
`DEFAULT_MEMORY_BUDGET`.

    >>> budget_bytes(2**20), budget_bytes() == DEFAULT_MEMORY_BUDGET or "NETSIM_MEMORY_BUDGET is set"
    (1048576, True)
"""

from __future__ import annotations

import os
import re

#: The bytes one call may hold beyond the model and one chunk's working set, when neither
#: `memory_budget=` nor the environment variable `MEMORY_BUDGET_VARIABLE` says otherwise: the
#: Jacobians of `similarity`'s row blocks (and of the functions built like it) with their kernel
#: blocks, `soft_density`'s kept first pass, the index's query blocks. A larger budget means fewer
#: row blocks, so fewer passes over the columns; the measured gain flattens well below this
#: (`bench/memory_budget.py`, table in bench/RESULTS.md).
DEFAULT_MEMORY_BUDGET = 2**30
MEMORY_BUDGET_VARIABLE = "NETSIM_MEMORY_BUDGET"
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def budget_bytes(memory_budget: int | None = None) -> int:
    """The memory budget of a call in bytes: `memory_budget` when given, else the environment variable
    `NETSIM_MEMORY_BUDGET` (bytes, or with a binary unit: "512MiB", "2G"), else `DEFAULT_MEMORY_BUDGET`.

    Raises:
        ValueError: a negative or non-integer budget, or a variable that does not read as one.
    """
    if memory_budget is not None:
        check_budget(memory_budget)
        return memory_budget
    text = os.environ.get(MEMORY_BUDGET_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MEMORY_BUDGET
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text.lower())
    if match is None:
        raise ValueError(f"{MEMORY_BUDGET_VARIABLE}={text!r} is not a memory size: give bytes, or a number with a "
                         "binary unit such as 512MiB or 2G")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def check_budget(memory_budget) -> None:
    """Raise unless `memory_budget` is None or a non-negative int (bytes; 0 holds the least)."""
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 0):
        raise ValueError(f"memory_budget must be a non-negative int (bytes) or None (the default, "
                         f"{MEMORY_BUDGET_VARIABLE} or {DEFAULT_MEMORY_BUDGET} bytes), got {memory_budget!r}")
