"""The library stands alone: importing netsim loads none of the reproduction, plotting or
notebook packages, and no library module looks for the repository around it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import netsim

LIBRARY = Path(netsim.__file__).resolve().parent
FORBIDDEN = ("netsim_paper", "matplotlib", "seaborn", "papermill", "nbformat", "nbclient", "pandas",
             "IPython", "notebooks")


def test_import_netsim_loads_no_reproduction_or_plotting_module():
    code = "import json, sys; import netsim; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True).stdout)
    offending = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert not offending, f"import netsim loaded {offending}"
    assert "netsim.kernel" in loaded  # the probe really imported the library


def _imports(path: Path, module_level: bool = False) -> set[str]:
    modules = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body if module_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


#: Optional integrations (extras of the library): the one module that may use each, inside a function
#: (imported when asked for, never when netsim is).
OPTIONAL = {"faiss": "ann.py"}


def test_no_library_module_imports_outside_torch_numpy_tqdm_and_the_standard_library():
    allowed_third_party = {"torch", "numpy", "tqdm", "netsim"}
    for path in sorted(LIBRARY.rglob("*.py")):
        top_level = {m.split(".")[0] for m in _imports(path, module_level=True)}
        for module in _imports(path):
            top = module.split(".")[0]
            if OPTIONAL.get(top) == path.name:
                assert top not in top_level, f"{path.name} imports the optional {top} when netsim is imported"
                continue
            assert top in allowed_third_party or top in sys.stdlib_module_names, f"{path.name} imports {module}"


def test_no_library_module_looks_for_the_repository():
    markers = ("pyproject", "run_all", "repo_root", "notebooks/", "figures/", "Path.cwd", "__file__")
    for path in sorted(LIBRARY.rglob("*.py")):
        text = path.read_text()
        assert not [m for m in markers if m in text], f"{path.name} refers to the repository layout"


def test_no_module_imports_another_modules_private_names():
    reproduction = LIBRARY.parent / "netsim_paper"
    for path in sorted([*LIBRARY.rglob("*.py"), *reproduction.rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
