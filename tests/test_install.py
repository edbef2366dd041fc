"""The README's editable install works on machines that cannot build the CUDA extension.

Each case copies the source tree (without any built ``_C`` library) into a temporary folder, makes a virtual
environment that sees this interpreter's packages (torch and the build tools come from there), and runs
``pip install --no-deps --no-build-isolation -e .``: with the build skipped by the environment variable, with
no nvcc to be found, and with an nvcc run that fails. Before the fix, setup.py declared the extension even
when it skipped it, and the editable install ended in "can't copy '..._C...so': doesn't exist".
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and the repository's checkout"
)


def _copy_tree(dst: Path) -> Path:
    """The tracked (and untracked, not ignored) files of the checkout: what a fresh clone has."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if not src.is_file():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)
    assert not list(dst.rglob("_C*.so")), "the copied tree must not hold a built extension"
    return dst


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    pytest.importorskip("wheel", reason="--no-build-isolation needs the wheel package (in the test extra)")
    where = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(where)],
                   check=True)
    return where / "bin" / "python"


@pytest.mark.parametrize(
    "env, says",
    [
        ({"MOCA_KERNELS_SKIP_CUDA_BUILD": "1"}, "MOCA_KERNELS_SKIP_CUDA_BUILD=1: skipping"),
        ({"MOCA_KERNELS_NVCC": "/nonexistent/nvcc", "PATH": "/usr/bin:/bin"}, "nvcc not found"),
        ({"MOCA_KERNELS_NVCC": "/bin/false"}, "building the CUDA extension failed"),
    ],
    ids=["skip", "no-nvcc", "nvcc-fails"],
)
def test_editable_install_without_extension(tmp_path, venv, env, says):
    src = _copy_tree(tmp_path / "src")
    # PYTHONPATH would put another copy of the package ahead of the installed one
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MOCA_KERNELS_") and k != "PYTHONPATH"}
    run_env.update(env)
    run_env["PYTHONNOUSERSITE"] = "1"
    # the venv python finds pip in the system site-packages; PATH keeps it reachable with a reduced PATH
    r = subprocess.run(
        [str(venv), "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."],
        cwd=src, env=run_env, capture_output=True, text=True, timeout=600,
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "can't copy" not in log
    assert says in log, log[-4000:]
    assert not list(src.rglob("_C*.so"))
    # From another folder, the installed (editable) package is the copy, and it works without the extension.
    probe = (
        "import moca_kernels as mk, moca_kernels._ext as e, torch;"
        "print(mk.__file__);"
        "print(e.available());"
        "x = torch.randn(4, 3);"
        "print(float(mk.masked_patch_loss(x, x + 1, torch.tensor([True, False, True, True]), impl='torch')))"
    )
    out = subprocess.run([str(venv), "-c", probe], cwd=tmp_path, env=run_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    file, available, loss = out.stdout.split()
    assert Path(file).resolve().is_relative_to(src.resolve())
    assert available == "False"
    assert float(loss) > 0
