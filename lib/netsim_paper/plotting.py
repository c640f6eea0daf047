"""One figure style and one `savefig` for every notebook.

    >>> import matplotlib.pyplot as plt
    >>> from netsim_paper import plotting
    >>> plotting.use_style()
    >>> fig, ax = plt.subplots()
    >>> paths = plotting.savefig(fig, "02_sinusoid_density")   # -> [.png, .pdf]

Where figures go (first match wins):

1. `$NETSIM_FIGURES_DIR` — set by `run_all.sh` (netsim_paper.runner) to a staging directory, so a
   notebook that fails half-way never overwrites the committed figures;
2. `figures/` for the paper profile, `figures/smoke/` (git-ignored) for the smoke profile,
   the profile being the `profile=` argument, else `$NETSIM_PROFILE`, else "paper".
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import check_profile, repo_root

#: Raster resolution of the PNG copies; the PDF is vector.
DPI = 150


def current_profile(profile: str | None = None) -> str:
    """`profile` if given, else `$NETSIM_PROFILE`, else "paper"; validated."""
    return check_profile(profile or os.environ.get("NETSIM_PROFILE") or "paper")


def profile_figures_dir(profile: str | None = None) -> Path:
    """The committed location for a profile, ignoring `$NETSIM_FIGURES_DIR`.

    `figures/` for "paper", `figures/smoke/` for "smoke" (smoke figures are never committed).
    """
    root = repo_root() / "figures"
    return root if current_profile(profile) == "paper" else root / "smoke"


def figures_dir(profile: str | None = None) -> Path:
    """Where `savefig` and `netsim_paper.report.write_metrics` write; created if missing.

    `$NETSIM_FIGURES_DIR` if set, else `profile_figures_dir(profile)`.
    """
    env = os.environ.get("NETSIM_FIGURES_DIR")
    path = Path(env) if env else profile_figures_dir(profile)
    path.mkdir(parents=True, exist_ok=True)
    return path


def use_style() -> None:
    """Apply the project's figure style: seaborn whitegrid, readable fonts, constrained layout.

    Call once at the top of a notebook. Fonts are sized for a figure shown at ~its natural
    width in a paper or README; PDF fonts are embedded as TrueType (editable text).
    """
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", palette="colorblind")
    mpl.rcParams.update({
        "figure.figsize": (6.4, 4.0),
        "figure.constrained_layout.use": True,
        "figure.dpi": 100,
        "savefig.dpi": DPI,
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "legend.fontsize": 10,
        "legend.frameon": True,
        "lines.linewidth": 1.8,
        "image.cmap": "viridis",
        "pdf.fonttype": 42,
        "ps.fonttype": 42,
    })


def savefig(fig, name: str, *, profile: str | None = None) -> list[Path]:
    """Write `fig` as `<figures_dir>/<name>.png` (150 dpi) and `<name>.pdf`.

    Args:
        fig: a matplotlib Figure.
        name: file stem, by convention the notebook stem plus an optional suffix
            (`"02_sinusoid_density"`, `"02_sinusoid_density_counts"`); no directories,
            no extension.
        profile: overrides `$NETSIM_PROFILE` when choosing the directory.

    Returns:
        `[png_path, pdf_path]`.
    """
    if not name or Path(name).name != name or name in {".", ".."}:
        raise ValueError(f"figure name must be a bare file stem, got {name!r}")
    if Path(name).suffix.lower() in {".png", ".pdf"}:
        raise ValueError(f"figure name must not carry an extension, got {name!r}")
    out = figures_dir(profile)
    png, pdf = out / f"{name}.png", out / f"{name}.pdf"
    fig.savefig(png, dpi=DPI)
    # No creation date in the PDF: committed figures then only change when the plot does.
    fig.savefig(pdf, metadata={"CreationDate": None})
    return [png, pdf]
