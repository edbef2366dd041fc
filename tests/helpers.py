"""Tolerance helpers: compare against a float64 reference, with tolerances set by PyTorch's own error.

A kernel's result passes when its max abs error against float64 is at most ``factor`` times the max abs
error of PyTorch computing the same thing in the same low precision, plus a small floor for rounding noise
(FlashAttention's rule). NaN or inf never passes. Also: ``compile_for_sm90``, the runner of the tests that
compile kernels for the H100 on a machine without a GPU.
"""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

# Rounding floors relative to the reference's scale: a few units of the dtype's roundoff.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_like_torch(ours: torch.Tensor, ref64: torch.Tensor, torch_lowp: torch.Tensor, dtype=None,
                            factor: float = 2.0, what: str = "output") -> None:
    """ours, torch_lowp: results in low precision; ref64: float64 reference of the same quantity."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values in the result"
    dtype = dtype or ours.dtype
    scale = max(ref64.double().abs().max().item(), 1e-30)
    err = max_abs_err(ours, ref64)
    base = max_abs_err(torch_lowp, ref64)
    bound = factor * base + FLOOR[dtype] * scale
    assert err <= bound, f"{what}: max abs error {err:.3e} > {factor} x torch's {base:.3e} + floor ({bound:.3e})"


def free_port() -> str:
    """A TCP port on localhost that nothing listens on now (for torchrun's rendezvous in tests; a fixed port
    collides with any other run of the suite on the same machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    """Fresh random normal data (never zeros)."""
    return (torch.randn(*shape, dtype=torch.float32, device=device) * scale).to(dtype)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_for_sm90(argv, drop_env=()):
    """Run ``python argv...`` (a ``-c`` script or a bench script) with the real Triton compiler, not the
    interpreter, and return the JSON of its last ``RESULT {...}`` line: kernels compiled for sm_90 on a machine
    without a GPU. Skips the calling test where this triton cannot reach sm_90 here (no ptxas / libcuda); any
    other failure is an assertion error with the end of stderr. ``drop_env``: variables to clear in the child
    (a kernel-variant switch the test's own settings must not leak into). To check the GPU machine's triton,
    put an unpacked wheel of it first on PYTHONPATH (bench/NOTES.md)."""
    triton = pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and k not in drop_env}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()
        if any(s in proc.stderr for s in ("ptxas", "No such file", "libcuda")) and "NameError" not in proc.stderr:
            pytest.skip(f"this triton {triton.__version__} cannot compile for sm_90 here: {err[-1] if err else ''}")
        raise AssertionError("compiling for sm_90 failed:\n" + "\n".join(err[-25:]))
    return json.loads(lines[-1][len("RESULT "):])


def png_bytes(w: int = 40, h: int = 28, seed: int = 0) -> bytes:
    """A w x h RGB PNG of random pixels (seeded), as bytes."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(w: int = 10000, h: int = 10000) -> bytes:
    """PNG bytes whose header says w x h (1 bit per pixel) with almost no pixel data: what a decompression bomb
    looks like before decoding (too large, never decoded)."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))



@contextlib.contextmanager
def gloo_worker(rank: int, world: int, port):
    """The body of a distributed test's worker (``spawn_workers``): one thread, a gloo process group on
    localhost:``port``, destroyed at the end. After every check passed (a failure raised in the body reaches
    ``mp.spawn``), the worker leaves without the interpreter's teardown: with DDP steps or interpreted Triton
    kernels in the process, a static destructor at exit aborted ("terminate called without an active exception",
    SIGABRT) in about one run of six to eight, after all checks."""
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_workers(worker, world: int, *args) -> None:
    """``worker(rank, world, port, *args)`` in ``world`` processes (torch.multiprocessing), on a free port."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, free_port(), *args), nprocs=world, join=True)

def readme_snippet(heading: str) -> str:
    """The first python block under ``heading`` (e.g. "### flash-attn and xformers") in README.md, up to the next
    heading."""
    import re

    text = open(os.path.join(ROOT, "README.md")).read()
    assert heading in text, f"README.md lost its heading {heading!r}"
    section = re.split(r"\n##+ ", text.split(heading, 1)[1], maxsplit=1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def tree_digest(root) -> str:
    """SHA-256 over a folder's file names and contents, with the folder's own path replaced (two runs that
    write the same files into different folders give the same digest)."""
    import hashlib
    from pathlib import Path

    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes().replace(str(root).encode(), b"ROOT"))
    return h.hexdigest()
