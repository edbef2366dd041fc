"""The pytest-benchmark suite in bench/: collected only when asked for, with no GPU-only peer imported at
collection, and a CPU case writes JSON that bench/plot.py turns into a table. Runs bench/ in subprocesses (the
tests import nothing from bench)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("liger_kernel", "cut_cross_entropy", "inf_cl", "flash_attn", "xformers")


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          **kw)


def test_default_run_does_not_collect_bench():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert conf["testpaths"] == ["tests"]


def test_collection_imports_no_peer():
    # harness.peer (the scripts' "is this peer installed?" import) must not run either: where a peer is installed
    # (the GPU machine), that call would import it
    code = ("import sys, pytest\n"
            "import bench.harness as h\n"
            "asked = []\n"
            "real = h.peer\n"
            "h.peer = lambda m: asked.append(m) or real(m)\n"
            "rc = pytest.main(['bench', '--collect-only', '-q', '-p', 'no:cacheprovider'])\n"
            f"print('PEERS', [m for m in {PEERS!r} if m in sys.modules], 'ASKED', asked); sys.exit(rc)")
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "PEERS [] ASKED []" in proc.stdout, proc.stdout[-500:]
    assert "test_attention_metadata_cpu" in proc.stdout and "test_attention_gpu" in proc.stdout


def test_cpu_case_writes_json_and_plot_reads_it(tmp_path):
    run = tmp_path / "run.json"
    proc = _run(["-m", "pytest", "bench", "--benchmark-only", "-q", "-p", "no:cacheprovider", "--bench-rounds", "2",
                 "-k", "metadata_cpu and documents", f"--benchmark-json={run}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    data = json.loads(run.read_text())
    peers = {b["extra_info"]["peer"] for b in data["benchmarks"]}
    assert peers == {"moca metadata, torch builder", "moca from_seqlens (host list) + tables"}
    assert len({b["group"] for b in data["benchmarks"]}) == 1   # peers side by side in one group per shape
    table = _run([str(ROOT / "bench" / "plot.py"), str(run)])
    assert table.returncode == 0, table.stderr
    assert "moca metadata, torch builder" in table.stdout and "x fastest" in table.stdout
