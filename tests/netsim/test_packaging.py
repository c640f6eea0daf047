"""The library is a distribution of its own (lib/pyproject.toml): its wheel holds the netsim
package alone and requires only torch, numpy and tqdm."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[2] / "lib"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources.
    source, out = tmp_path_factory.mktemp("lib"), tmp_path_factory.mktemp("wheel")
    shutil.copytree(LIB, source, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info", "netsim_paper"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, capture_output=True)
    (path,) = out.glob("netsim-*.whl")
    return path


def test_library_wheel_requires_only_torch_numpy_and_tqdm(wheel):
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    lines = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    requires = [r for r in lines if "extra ==" not in r]
    names = sorted(r.split(">")[0].split("=")[0].split("<")[0].split(";")[0].strip() for r in requires)
    assert names == ["numpy", "torch", "tqdm"], requires
    assert all(">=" in r and "==" not in r.split(";")[0] for r in lines), "lower bounds only, no exact pins"
    # Hugging Face support is an extra (`pip install ./lib[hf]`), never a requirement: netsim does not import it
    extras = sorted(r.split(">")[0] for r in lines if 'extra == "hf"' in r)
    assert extras == ["tokenizers", "transformers"], lines


def test_library_wheel_ships_the_library_alone(wheel):
    with zipfile.ZipFile(wheel) as zf:
        packages = {n.split("/")[0] for n in zf.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"netsim"}


def test_version_is_the_distributions():
    import tomllib

    import netsim
    with open(LIB / "pyproject.toml", "rb") as f:
        assert netsim.__version__ == tomllib.load(f)["project"]["version"]
