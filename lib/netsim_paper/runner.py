"""Execute the notebooks headless with papermill; the engine of `run_all.sh`.

    python -m netsim_paper.runner [--profile paper|smoke] [NOTEBOOK ...]

Runs every `notebooks/[0-9][0-9]_*.ipynb` in order (or only the named ones: a stem such as
`02_sinusoid_density`, a file name, or a path), injecting `profile` and `seed` into the
cell tagged `parameters` and setting `$NETSIM_PROFILE` for the kernel.

Figures only change when a notebook succeeds: each notebook writes into a fresh staging
directory (`$NETSIM_FIGURES_DIR`, honoured by `netsim_paper.plotting.savefig` and
`netsim_paper.report.write_metrics`), and only after it finished without error are its files
moved into `figures/` (paper) or `figures/smoke/` (smoke), replacing older versions of those
same files and nothing else. On the first failure the run stops, names the notebook and
the failing cell, discards the staging directory and exits with status 1. Executed
notebooks (with outputs and any traceback) are kept in `build/notebooks/<profile>/`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .config import PROFILES, repo_root
from .plotting import profile_figures_dir

KERNEL = "python3"
PATTERN = "[0-9][0-9]_*.ipynb"


class NotebookNotFound(ValueError):
    """A notebook named on the command line does not exist."""


@dataclass(frozen=True)
class CellFailure:
    """Where and how a notebook failed.

    `index` is the 0-based index of the cell in the source notebook (papermill's injected
    parameters cell is discounted); `exec_count` is the `In [n]` number in the executed one.
    """

    index: int | None
    exec_count: int | None
    ename: str
    evalue: str
    source: str = ""

    def describe(self) -> str:
        where = "an unknown cell" if self.index is None else f"cell {self.index} (0-based)"
        if self.exec_count is not None:
            where += f", In [{self.exec_count}] of the executed copy"
        first = next((line for line in self.source.splitlines() if line.strip()), "")
        text = f"{where}: {self.ename}: {self.evalue}".rstrip(": ")
        return text + (f"\n    cell starts with: {first.strip()[:100]}" if first else "")


def find_notebooks(names: Sequence[str], notebooks_dir: Path) -> list[Path]:
    """Resolve the notebooks to run, in order.

    Args:
        names: stems, file names or paths; empty means every `PATTERN` match, sorted.
        notebooks_dir: where stems and file names are looked up.

    Raises:
        NotebookNotFound: a name matches no file (the message lists what exists).
    """
    available = sorted(notebooks_dir.glob(PATTERN))
    if not names:
        return available
    found = []
    for name in names:
        candidates = [Path(name), notebooks_dir / name, notebooks_dir / f"{name}.ipynb"]
        match = next((c for c in candidates if c.suffix == ".ipynb" and c.is_file()), None)
        if match is None:
            listing = ", ".join(p.stem for p in available) or "none"
            raise NotebookNotFound(f"no notebook {name!r} (in {notebooks_dir}: {listing})")
        found.append(match)
    return found


def first_error(executed: Path) -> CellFailure | None:
    """The first code cell with an error output in an executed notebook, if any."""
    import nbformat

    try:
        nb = nbformat.read(executed, as_version=4)
    except Exception:  # noqa: BLE001 - a missing/garbled output notebook is just "unknown"
        return None
    cells = [c for c in nb.cells if "papermill-error-cell-tag" not in c.get("metadata", {}).get("tags", [])]
    for index, cell in enumerate(cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                return CellFailure(_source_index(cells, index), cell.get("execution_count"),
                                   out.get("ename", "Error"), out.get("evalue", ""), cell.source)
    return None


def _source_index(cells: list, index: int) -> int:
    """Map an executed-notebook cell index back to the source notebook's numbering."""
    injected = [i for i, c in enumerate(cells)
                if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    return index - sum(1 for i in injected if i < index)


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Temporarily set environment variables (the kernel inherits the runner's environment)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def publish(staging: Path, dest: Path) -> list[Path]:
    """Move every file under `staging` to the same relative path under `dest`.

    Replaces existing files of the same name (os.rename is atomic on one file system, and
    the staging directory lives in build/ next to figures/); leaves every other file alone.
    """
    moved = []
    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = dest / src.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(target))
        moved.append(target)
    return moved


def run_notebook(notebook: Path, *, profile: str, seed: int, executed: Path, staging: Path,
                 kernel: str = KERNEL) -> CellFailure | None:
    """Execute one notebook with papermill; return None on success, else where it failed."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    executed.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "NETSIM_PROFILE": profile,
        "NETSIM_FIGURES_DIR": str(staging),
        # The kernel's own inline backend, even if the caller exported MPLBACKEND=Agg:
        # executed notebooks in build/ then keep their pictures.
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    try:
        with _environ(**env):
            pm.execute_notebook(
                str(notebook), str(executed),
                parameters={"profile": profile, "seed": seed},
                kernel_name=kernel, progress_bar=False, cwd=str(notebook.parent),
            )
    except PapermillExecutionError as err:
        failure = first_error(executed)
        if failure is None:  # fall back on the exception itself
            failure = CellFailure(err.cell_index, err.exec_count, err.ename, err.evalue, err.source)
        return failure
    except Exception as err:  # noqa: BLE001 - dead kernel, timeout, unreadable notebook ...
        message = str(err).strip()
        return first_error(executed) or CellFailure(
            None, None, type(err).__name__, message.splitlines()[0] if message else "")
    return None


def run(notebooks: Sequence[Path], *, profile: str, seed: int = 0, figures_dir: Path,
        build_dir: Path, kernel: str = KERNEL) -> int:
    """Run `notebooks` in order, publishing each one's figures; stop at the first failure.

    Returns:
        0 if all succeeded, 1 at the first failure (already reported on stderr).
    """
    staging_root = build_dir / "staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    for i, notebook in enumerate(notebooks, 1):
        executed = build_dir / "notebooks" / profile / notebook.name
        print(f"[{i}/{len(notebooks)}] {notebook.name} ({profile}) ...", flush=True)
        t0 = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f"{notebook.stem}.", dir=staging_root))
        try:
            failure = run_notebook(notebook, profile=profile, seed=seed, executed=executed,
                                   staging=staging, kernel=kernel)
            elapsed = time.perf_counter() - t0
            if failure is not None:
                print(f"[{i}/{len(notebooks)}] FAILED {notebook} after {elapsed:.1f} s at "
                      f"{failure.describe()}\n    executed notebook with the traceback: {executed}\n"
                      f"    {figures_dir} left untouched; remaining notebooks not run.",
                      file=sys.stderr, flush=True)
                return 1
            moved = publish(staging, figures_dir)
            print(f"[{i}/{len(notebooks)}] ok {notebook.name} in {elapsed:.1f} s, "
                  f"{len(moved)} file(s) -> {figures_dir}", flush=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"all {len(notebooks)} notebook(s) passed in {time.perf_counter() - total:.1f} s "
          f"({profile} profile)", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    root = repo_root()
    parser = argparse.ArgumentParser(prog="python -m netsim_paper.runner", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                        help=f"stems, file names or paths; default: notebooks/{PATTERN}")
    parser.add_argument("--profile", choices=PROFILES, default="paper")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--notebooks-dir", type=Path, default=root / "notebooks")
    parser.add_argument("--figures-dir", type=Path, default=None,
                        help="where figures are published; default figures/ or figures/smoke/")
    parser.add_argument("--build-dir", type=Path, default=root / "build")
    parser.add_argument("--kernel", default=KERNEL)
    args = parser.parse_args(argv)

    try:
        notebooks = find_notebooks(args.notebooks, args.notebooks_dir)
    except NotebookNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not notebooks:
        print(f"error: no notebooks matching {PATTERN} in {args.notebooks_dir}", file=sys.stderr)
        return 2
    figures = args.figures_dir or profile_figures_dir(args.profile)
    return run(notebooks, profile=args.profile, seed=args.seed, figures_dir=figures,
               build_dir=args.build_dir, kernel=args.kernel)


if __name__ == "__main__":
    sys.exit(main())
