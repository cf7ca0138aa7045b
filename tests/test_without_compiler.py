"""Without a C++ compiler everything runs on the PyTorch backends: the backend and kernel tests pass in a fresh
process whose CXX points nowhere and whose extension cache is empty, the kernel tests skipped with a reason that
names the missing compiler."""

import os
import subprocess
import sys
from pathlib import Path


def test_backend_and_kernel_tests_pass_without_a_compiler(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    files = ["tests/test_cpu_kernels.py", "tests/test_backends.py", "tests/test_dsa.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", *files], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    summary = done.stdout[-4000:]
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert "passed" in summary and "failed" not in summary
    assert "SKIPPED" in summary and "no C++ compiler" in summary  # the kernel tests, with the reason
    assert not any((tmp_path / "extensions").rglob("*.so"))  # nothing was compiled


def test_kernels_build_command_names_the_missing_compiler(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    done = subprocess.run([sys.executable, "-m", "dsa.kernels", "build"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"dsa: the CPU kernels cannot be built: no C++ compiler: {env['CXX']!r} (CXX or c++) is not on PATH"
    )
    usage = subprocess.run([sys.executable, "-m", "dsa.kernels", "compile"], env=env, capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "usage: python -m dsa.kernels build" in usage.stderr
