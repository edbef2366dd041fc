"""The optional CUDA extension: builds where nvcc is, imports on CPU-only machines, checks its arguments."""

import os
import shutil

import pytest
import torch

from moca_kernels import _ext

NVCC = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
SKIPPED = os.environ.get("MOCA_KERNELS_SKIP_CUDA_BUILD") == "1"


@pytest.mark.skipif(not NVCC or SKIPPED, reason="no nvcc here (or the build was skipped on purpose)")
def test_extension_was_built_and_imports():
    assert _ext.available(), _ext.unavailable_reason()
    mod = _ext.module()
    assert mod.runtime_version() >= 11000
    assert mod.error_string(1)  # cudaErrorInvalidValue has a text


@pytest.mark.skipif(not _ext.available(), reason="extension not built")
def test_launcher_rejects_bad_sizes_without_touching_memory():
    # N = 0 is refused before any launch: the launcher returns cudaErrorInvalidValue (1).
    status = _ext.module().masked_patch_loss_fwd(0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 0, 1e-6, False, False, 0)
    assert status == 1


@pytest.mark.skipif(not _ext.available(), reason="extension not built")
def test_launcher_rejects_unknown_dtype_code():
    status = _ext.module().masked_patch_loss_fwd(0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 99, 1e-6, False, False, 0)
    assert status == 1


def test_dtype_codes_cover_the_kernel_dtypes():
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert _ext.dtype_code(torch.empty(0, dtype=dt)) in (0, 1, 2)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        _ext.dtype_code(torch.empty(0, dtype=torch.int32))


def test_unavailable_extension_gives_a_reason(monkeypatch):
    monkeypatch.setattr(_ext, "_tried", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", "not built in this test")
    assert not _ext.available()
    with pytest.raises(ImportError, match="not built in this test"):
        _ext.module()


def test_setup_py_runs_without_torch():
    """setup.py imports no torch at module level: metadata queries work where torch cannot be imported."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', '__file__': 'setup.py'})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == __import__("moca_kernels").__version__


def test_install_without_nvcc_skips_the_extension_with_one_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, MOCA_KERNELS_NVCC=str(tmp_path / "no-nvcc-here"))
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("moca_kernels:")]
    assert len(lines) == 1 and "nvcc not found" in lines[0]
    assert not list((tmp_path / "lib").rglob("_C*.so"))
