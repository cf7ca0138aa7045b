"""The installable package: `uv build` makes a wheel that holds dsa/ with its package data (the bundled
samples that the presets name, the C++ kernel sources), so that an installed dsa works from any directory."""

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

import dsa
from dsa.presets import PRESETS, SAMPLES_DIR

REPO = Path(__file__).resolve().parents[1]


def test_preset_samples_are_inside_the_package():
    package = Path(dsa.__file__).resolve().parent
    assert SAMPLES_DIR == package / "samples"
    named = {Path(path) for stage in PRESETS["tiny"].values() for path in stage["data"].split(",")}
    assert len(named) == 4  # sft_sample_en/zh (training), coig_p_sample (DPO), sft_heldout (compare)
    assert all(path.parent == SAMPLES_DIR and path.is_file() for path in named)


def test_wheel_holds_the_package_and_its_data(tmp_path):
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("the uv executable is not found")
    done = subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(REPO)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    def under_dsa(pattern: str) -> set[str]:
        return {path.relative_to(REPO).as_posix() for path in (REPO / "dsa").rglob(pattern)}

    assert "dsa/__init__.py" in names and under_dsa("*.py") <= names
    samples = under_dsa("samples/*.jsonl")
    assert len(samples) == 4 and samples <= names
    cpp = under_dsa("*.cpp")
    assert cpp and cpp <= names  # the C++ kernel sources, compiled on first use from the installed package
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
