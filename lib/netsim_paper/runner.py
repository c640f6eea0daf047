"""Execute the notebooks headless with papermill; the engine of `run_all.sh`.

    python -m netsim_paper.runner [--profile paper|smoke] [NOTEBOOK ...]

Runs every `notebooks/[0-9][0-9]_*.ipynb` in order (or only the named ones: a stem such as
`02_sinusoid_density`, a file name, or a path), injecting `profile` and `seed` into the
cell tagged `parameters` and setting `$NETSIM_PROFILE` for the kernel.

Results only change when a notebook succeeds: each notebook writes into a fresh staging
directory (`$NETSIM_FIGURES_DIR`, honoured by `netsim_paper.plotting.savefig` and
`netsim_paper.report.write_metrics`), and only after it finished without error are its files
moved into `figures/` (paper) or `figures/smoke/` (smoke), replacing older versions of those
same files and nothing else. In the paper profile the executed notebook, with its outputs and
figures, is then published to `figures/notebooks/<stem>.ipynb` for readers who do not run
anything: slimmed (widget state and progress-bar redraws dropped, long stderr cut) and at most
`MAX_PUBLISHED_BYTES`, else the notebook counts as failed. Executed copies (with outputs and
any traceback) are always kept in `build/notebooks/<profile>/`.

On the first failure the run stops, says why -- the failing cell and its error, a malformed
source notebook, or a kernel that died (its exit code and the last cell that started) --,
discards the staging directory and exits with status 1.
"""

from __future__ import annotations

import argparse
import copy
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
#: Size limit of a published notebook: GitHub's viewer and browsers render a few MB comfortably.
MAX_PUBLISHED_BYTES = 5 * 1024 * 1024
#: Lines of one stderr stream output kept in a published notebook (the last ones).
STDERR_LINES = 40
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


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


@dataclass(frozen=True)
class NotebookFailure:
    """A notebook that failed outside any cell's own error: a malformed source, a dead kernel,
    a kernel that could not start, a published copy over the size limit."""

    message: str

    def describe(self) -> str:
        return self.message


Failure = CellFailure | NotebookFailure


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


def check_source(notebook: Path) -> NotebookFailure | None:
    """None if `notebook` is a readable, schema-valid nbformat 4 notebook, else what is wrong."""
    import nbformat

    try:
        nbformat.validate(nbformat.read(notebook, as_version=4))
    except Exception as err:  # noqa: BLE001 - JSON, nbformat schema and I/O errors alike
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        detail = " | ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")
        return NotebookFailure(f"the source notebook {notebook} is malformed: {type(err).__name__}: {detail}")
    return None


def last_started(executed: Path) -> tuple[int, str] | None:
    """The last cell papermill started in an executed notebook: (its source index, its source)."""
    import nbformat

    try:
        nb = nbformat.read(executed, as_version=4)
    except Exception:  # noqa: BLE001 - no executed copy: nothing started
        return None
    cells = [c for c in nb.cells if "papermill-error-cell-tag" not in c.get("metadata", {}).get("tags", [])]
    started = [i for i, c in enumerate(cells) if c.get("metadata", {}).get("papermill", {}).get("start_time")]
    return (_source_index(cells, started[-1]), cells[started[-1]].source) if started else None


def _kernel_died(executed: Path, exit_codes: list[int | None]) -> NotebookFailure:
    code = next((c for c in exit_codes if c is not None), None)
    how = ("exit code unknown" if code is None
           else f"killed by signal {-code}" if code < 0 else f"exit code {code}")
    message = f"the kernel died ({how})"
    started = last_started(executed)
    if started is None:
        return NotebookFailure(message + " before any cell started")
    first = next((line for line in started[1].splitlines() if line.strip()), "")
    return NotebookFailure(f"{message} while running cell {started[0]} (0-based, the last cell that started)"
                           + (f"\n    cell starts with: {first.strip()[:100]}" if first else ""))


def _exit_code_recorder(exit_codes: list[int | None]) -> type:
    """A kernel manager class that appends the exit code of a kernel process that ended on its own
    to `exit_codes` (nbclient's DeadKernelError does not carry it). nbclient skips the shutdown
    of a dead kernel and only cleans up its resources: the process is still there to poll."""
    from jupyter_client.manager import AsyncKernelManager

    class ExitCodeKernelManager(AsyncKernelManager):
        async def cleanup_resources(self, restart: bool = False) -> None:
            if self.provisioner is not None and self.provisioner.has_process:
                exit_codes.append(await self.provisioner.poll())
            await super().cleanup_resources(restart=restart)

    return ExitCodeKernelManager


def run_notebook(notebook: Path, *, profile: str, seed: int, executed: Path, staging: Path,
                 kernel: str = KERNEL) -> Failure | None:
    """Execute one notebook with papermill; return None on success, else why it failed.

    A stale executed copy is removed first, so that after a failure `executed` exists only if
    this run wrote it.
    """
    import papermill as pm
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    executed.unlink(missing_ok=True)
    malformed = check_source(notebook)
    if malformed is not None:
        return malformed
    executed.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "NETSIM_PROFILE": profile,
        "NETSIM_FIGURES_DIR": str(staging),
        # The kernel's own inline backend, even if the caller exported MPLBACKEND=Agg:
        # executed notebooks keep their pictures.
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    }
    exit_codes: list[int | None] = []
    try:
        with _environ(**env):
            pm.execute_notebook(
                str(notebook), str(executed),
                parameters={"profile": profile, "seed": seed},
                kernel_name=kernel, progress_bar=False, cwd=str(notebook.parent),
                kernel_manager_class=_exit_code_recorder(exit_codes),
            )
    except PapermillExecutionError as err:
        failure = first_error(executed)
        if failure is None:  # fall back on the exception itself
            failure = CellFailure(err.cell_index, err.exec_count, err.ename, err.evalue, err.source)
        return failure
    except DeadKernelError:
        return _kernel_died(executed, exit_codes)
    except Exception as err:  # noqa: BLE001 - a kernel that cannot start, a timeout ...
        message = str(err).strip()
        return first_error(executed) or NotebookFailure(
            f"{type(err).__name__}: {message.splitlines()[0] if message else ''}".rstrip(": "))
    return None


def _terminal_text(text: str) -> str:
    """What a terminal would show: of each line's carriage-return redraws, the last one."""
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))


def slim_notebook(nb: dict, *, stderr_lines: int = STDERR_LINES) -> dict:
    """A copy of an executed notebook (nbformat JSON) fit for publishing.

    Drops widget state and widget outputs (tqdm's notebook bars), reduces carriage-return
    redraws in stream outputs to their final state, keeps the last `stderr_lines` lines of each
    stderr output and removes papermill's machine-specific input / output paths.
    """
    nb = copy.deepcopy(nb)
    nb.get("metadata", {}).pop("widgets", None)
    for key in ("input_path", "output_path"):
        nb.get("metadata", {}).get("papermill", {}).pop(key, None)
    for cell in nb.get("cells", []):
        outputs = []
        for out in cell.get("outputs", []):
            if WIDGET_MIME in out.get("data", {}):
                continue
            if out.get("output_type") == "stream":
                text = out["text"] if isinstance(out["text"], str) else "".join(out["text"])
                text = _terminal_text(text)
                lines = text.splitlines(keepends=True)
                if out.get("name") == "stderr" and len(lines) > stderr_lines:
                    dropped = len(lines) - stderr_lines
                    text = f"[... {dropped} earlier stderr lines dropped from the published copy ...]\n"
                    text += "".join(lines[-stderr_lines:])
                out = {**out, "text": text}
            outputs.append(out)
        if "outputs" in cell:
            cell["outputs"] = outputs
    return nb


def published_copy(executed: Path) -> bytes:
    """The bytes of the executed notebook as published: `slim_notebook` of it, in nbformat's JSON."""
    import nbformat

    nb = slim_notebook(nbformat.read(executed, as_version=4))
    return nbformat.writes(nbformat.from_dict(nb)).encode("utf-8") + b"\n"


def _write_atomic(data: bytes, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def run(notebooks: Sequence[Path], *, profile: str, seed: int = 0, figures_dir: Path,
        build_dir: Path, kernel: str = KERNEL, max_published_bytes: int = MAX_PUBLISHED_BYTES) -> int:
    """Run `notebooks` in order, publishing each one's figures; stop at the first failure.

    In the paper profile each succeeded notebook is also published (see `published_copy`) to
    ``figures_dir / "notebooks" / <name>``; a copy over `max_published_bytes` fails the notebook.

    Returns:
        0 if all succeeded, 1 at the first failure (already reported on stderr).
    """
    staging_root = build_dir / "staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    for i, notebook in enumerate(notebooks, 1):
        executed = build_dir / "notebooks" / profile / notebook.name
        published = figures_dir / "notebooks" / notebook.name if profile == "paper" else None
        print(f"[{i}/{len(notebooks)}] {notebook.name} ({profile}) ...", flush=True)
        t0 = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f"{notebook.stem}.", dir=staging_root))
        try:
            failure = run_notebook(notebook, profile=profile, seed=seed, executed=executed,
                                   staging=staging, kernel=kernel)
            if failure is None and published is not None:
                copy_bytes = published_copy(executed)
                if len(copy_bytes) > max_published_bytes:
                    failure = NotebookFailure(
                        f"its published copy would be {len(copy_bytes) / 2**20:.1f} MB, over the "
                        f"{max_published_bytes / 2**20:.1f} MB limit for {published}: shrink its outputs")
            elapsed = time.perf_counter() - t0
            if failure is not None:
                where = f" at {failure.describe()}" if isinstance(failure, CellFailure) else f": {failure.describe()}"
                trace = (f"\n    executed copy with its outputs: {executed}" if executed.exists()
                         else "\n    no executed copy was written")
                print(f"[{i}/{len(notebooks)}] FAILED {notebook} after {elapsed:.1f} s{where}{trace}\n"
                      f"    {figures_dir} left untouched; remaining notebooks not run.",
                      file=sys.stderr, flush=True)
                return 1
            moved = publish(staging, figures_dir)
            if published is not None:
                _write_atomic(copy_bytes, published)
            note = f", executed notebook -> {published}" if published is not None else ""
            print(f"[{i}/{len(notebooks)}] ok {notebook.name} in {elapsed:.1f} s, "
                  f"{len(moved)} file(s) -> {figures_dir}{note}", flush=True)
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
