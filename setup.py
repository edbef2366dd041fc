"""Build script for moca and moca_kernels.

The Python packages install everywhere. The optional CUDA extension ``moca_kernels._C`` is compiled from
``csrc/`` with nvcc (driven by ninja when it is available) and bound with pybind11. It never includes torch's
C++ headers: launchers take raw device pointers, sizes, strides and a stream handle from Python, so one build
works with any torch version, and it compiles on machines with nvcc but no GPU.

Environment variables:
  MOCA_KERNELS_SKIP_CUDA_BUILD=1     do not build the extension
  MOCA_KERNELS_CUDA_ARCHS="80;90a"   target architectures (';' or ',' separated, e.g. "90a" or "80;86;90a")
  MOCA_KERNELS_NVCC=/path/to/nvcc    compiler to use (default: $CUDA_HOME/bin/nvcc, then nvcc on PATH)
  MOCA_KERNELS_REQUIRE_CUDA_BUILD=1  make a failed build fail the install (default: warn and go on)
  MOCA_KERNELS_BUILD_JOBS=N          parallel compile jobs (default: number of CPUs)

This file does not import torch and never touches the network.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import util as importlib_util
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "80;90a"


def _say(msg: str) -> None:
    print(f"moca_kernels: {msg}", file=sys.stderr, flush=True)


def _find_nvcc():
    explicit = os.environ.get("MOCA_KERNELS_NVCC")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _pybind11_include():
    """pybind11's headers: from the pybind11 package, else the copy shipped inside torch (found, not imported)."""
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        pass
    spec = importlib_util.find_spec("torch")
    if spec is not None and spec.submodule_search_locations:
        inc = Path(list(spec.submodule_search_locations)[0]) / "include"
        if (inc / "pybind11" / "pybind11.h").exists():
            return str(inc)
    return None


def _gencode_flags(archs: str):
    flags = []
    names = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    if not names:
        raise ValueError(f"MOCA_KERNELS_CUDA_ARCHS={archs!r} names no architecture")
    for a in names:
        a = a.replace("sm_", "").replace("compute_", "")
        if not a[:2].isdigit():
            raise ValueError(f"MOCA_KERNELS_CUDA_ARCHS: cannot read architecture {a!r} (expected e.g. 80 or 90a)")
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    # PTX of the lowest plain architecture, so newer GPUs can JIT the kernels.
    plain = sorted(a.replace("sm_", "") for a in names if a.replace("sm_", "").isdigit())
    if plain:
        flags.append(f"-gencode=arch=compute_{plain[0]},code=compute_{plain[0]}")
    return flags


def _ninja_binary():
    path = shutil.which("ninja")
    if path:
        return path
    try:
        import ninja

        cand = Path(ninja.BIN_DIR) / "ninja"
        return str(cand) if cand.exists() else None
    except ImportError:
        return None


class BuildExtension(build_ext):
    """Builds moca_kernels._C with nvcc, or explains in one line why it is skipped."""

    def build_extensions(self):
        for ext in list(self.extensions):
            self.build_extension(ext)

    def _drop(self, ext):
        """Forget an extension that was not built: setuptools would otherwise list its (missing) output and,
        for an editable install, try to copy it into the source tree ("can't copy ... doesn't exist")."""
        self.extensions = [e for e in self.extensions if e is not ext]

    def build_extension(self, ext):
        if ext.name != "moca_kernels._C":
            return super().build_extension(ext)
        require = os.environ.get("MOCA_KERNELS_REQUIRE_CUDA_BUILD", "0") == "1"
        if os.environ.get("MOCA_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
            _say("MOCA_KERNELS_SKIP_CUDA_BUILD=1: skipping the CUDA extension; the Triton and torch backends still work.")
            self._drop(ext)
            return
        nvcc = _find_nvcc()
        if nvcc is None:
            msg = "nvcc not found (set CUDA_HOME or MOCA_KERNELS_NVCC): skipping the CUDA extension; Triton and torch backends still work."
            if require:
                raise RuntimeError(msg)
            _say(msg)
            self._drop(ext)
            return
        try:
            self._build_with_nvcc(ext, nvcc)
        except Exception as exc:  # never break an install because an optional extension failed
            if require:
                raise
            _say(f"building the CUDA extension failed ({exc}); continuing without it. "
                 "Set MOCA_KERNELS_REQUIRE_CUDA_BUILD=1 to make this an error.")
            self._drop(ext)

    def _build_with_nvcc(self, ext, nvcc):
        pybind_inc = _pybind11_include()
        if pybind_inc is None:
            raise RuntimeError("pybind11 headers not found (pip install pybind11)")
        archs = os.environ.get("MOCA_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp).resolve() / "moca_kernels_C"
        tmp.mkdir(parents=True, exist_ok=True)
        cflags = [
            "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
            "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
            f"-I{CSRC}", f"-I{pybind_inc}", f"-I{sysconfig.get_paths()['include']}",
            *_gencode_flags(archs),
        ]
        sources = [Path(s).resolve() for s in ext.sources]
        objects = [tmp / (s.name + ".o") for s in sources]
        link = [nvcc, "-shared", "--cudart", "static", "-o", str(out), *map(str, objects)]
        _say(f"building the CUDA extension with {nvcc} for {archs} ({len(sources)} files)")
        ninja = _ninja_binary()
        headers = sorted(str(p) for p in CSRC.glob("*.h")) + sorted(str(p) for p in CSRC.glob("*.cuh"))
        if ninja:
            q = lambda s: str(s).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")  # noqa: E731
            lines = [
                "ninja_required_version = 1.3",
                f"nvcc = {nvcc}",
                "cflags = " + " ".join(cflags),
                "rule cu",
                "  command = $nvcc $cflags -c $in -o $out",
                "  description = nvcc $in",
                "rule link",
                "  command = " + " ".join(link[:-len(objects)]) + " $in",
                "  description = link $out",
            ]
            for s, o in zip(sources, objects):
                lines.append(f"build {q(o)}: cu {q(s)}" + (" | " + " ".join(q(h) for h in headers) if headers else ""))
            lines.append(f"build {q(out)}: link " + " ".join(q(o) for o in objects))
            (tmp / "build.ninja").write_text("\n".join(lines) + "\n")
            jobs = os.environ.get("MOCA_KERNELS_BUILD_JOBS", str(os.cpu_count() or 1))
            subprocess.run([ninja, "-C", str(tmp), "-j", jobs], check=True)
        else:
            for s, o in zip(sources, objects):
                subprocess.run([nvcc, *cflags, "-c", str(s), "-o", str(o)], check=True)
            subprocess.run(link, check=True)
        _say(f"built {out.name}")


def _read_version():
    for line in (ROOT / "moca_kernels" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("moca_kernels/__init__.py has no __version__")


setup(
    name="moca",
    version=_read_version(),
    description="Kernels and trainers for bidirectional multimodal embedding models (MoCa)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["moca_kernels", "moca_kernels.*", "moca", "moca.*"]),
    package_data={"moca": ["data/*", "data/**/*", "configs/*.yaml"]},
    include_package_data=True,
    ext_modules=[Extension("moca_kernels._C", sources=sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu")) + sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")))],
    cmdclass={"build_ext": BuildExtension},
    install_requires=["torch>=2.5", "numpy", "tqdm", "pyyaml"],
    extras_require={
        "triton": ["triton>=3.0"],
        "model": ["transformers>=5.17", "tokenizers", "safetensors", "pillow", "pyyaml", "tqdm",
                  "matplotlib", "pyarrow"],  # tensorboard optional; matplotlib: moca demo's loss-curve PNG;
                                             # pyarrow: the published (parquet) data sets
        "lora": ["peft>=0.10"],   # Stage 2 with lora.enabled: true
        "bench": ["matplotlib"],
        "test": ["pytest", "wheel", "triton>=3.0", "transformers>=5.17", "tokenizers", "safetensors", "pillow", "matplotlib",
                 "peft>=0.10", "pyarrow",  # peft, pyarrow: the LoRA and parquet tests run instead of skipping
                 "hypothesis",  # the kernel argument fuzz (tests/moca_kernels/test_fuzz.py)
                 "pytrec-eval-terrier", "ranx",  # the metrics are checked against trec_eval and ranx
                 # the integrations, each tested against the package it stands in for (xformers is installed
                 # separately with --no-deps: its wheel pins one torch version; see the README's test command)
                 "sentence-transformers", "datasets", "mteb", "cut-cross-entropy", "liger-kernel"],
    },
    entry_points={"console_scripts": ["moca=moca.cli:main"]},
    zip_safe=False,
)
