"""bench/gpu_run.sh end to end on CPU (its --cpu-smoke mode: Triton interpreted, tiny shapes), bench/decide.py on
synthetic runs, and the harness's timer plan.

The smoke run is the point: the GPU run gets one try per session, so every step's Python must already have run
here. It checks that the script exits 0, that the summary has one "ok" row per step (setup, a ... i), and that the
results the decisions read were written. decide.py is checked against hand-made runs whose right answer is known:
a clear win flips, a win under the threshold, a noisy win, a failed or skipped gate test, different timers and a
missing timing each keep the default.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import decide  # noqa: E402
from bench.harness import GRAPH_BELOW_MS, MIN_EVENT_MS, MIN_EVENT_REPS, timer_plan  # noqa: E402

STEPS = ["setup", "a gate_tests", "b attn_bwd", "c mpl", "d mtl", "e attn_fwd", "f shapes", "g1 sweep_nce",
         "g2 sweep_mtl", "h full_tests", "i ncu"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_run_smoke_runs_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), GPU_RUN_WORK=str(work), PYTHONPATH=str(ROOT), PYTHON=sys.executable)
    env.pop("MOCA_KERNELS_IMPL", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh"), "--cpu-smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = [line.split("\t") for line in (work / "summary.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == STEPS, rows
    assert all(r[5] == "ok" for r in rows), rows
    # what comes back from the device machine: few files, the tarball holding every log
    assert sorted(p.name for p in out.iterdir()) == ["decisions.txt", "gpu_run.tgz", "run.json", "summary.txt"]
    res = work / "results"
    for name in ("gate_tests.xml", "attention_bwd.json", "attention_fwd.json", "full_tests.xml"):
        assert (res / name).exists(), name
    run = json.loads((out / "run.json").read_text())
    assert {"attention_bwd.base.documents.fwd_bwd", "attention_bwd.fused.mixed.bwd", "attention_fwd.ws.mixed.fwd",
            "masked_patch_loss.triton.v1", "masked_patch_loss.triton.v2", "masked_token_loss.v1",
            "masked_token_loss.v3"} <= set(run["metrics"]), sorted(run["metrics"])
    assert all(m["timer"] == "wall" for m in run["metrics"].values())
    # without a GPU no gate test ran: nothing may flip
    assert all(d["flip_to"] is None for d in run["decisions"])
    assert "did not run on a GPU" in (out / "decisions.txt").read_text()
    for log in ("c_mpl.log", "d_mtl.log", "i_ncu.log"):
        assert (work / "logs" / log).read_text().strip(), log


def _m(median, spread=0.004, timer="cudagraph"):
    return dict(median_ms=median, p20_ms=median * (1 - spread), p80_ms=median * (1 + spread), timer=timer)


def _run(metrics, tests=None):
    passed = dict(passed=5, failed=0, skipped=0)
    return dict(device="synthetic", metrics=metrics,
                tests=tests if tests is not None else {g: dict(passed) for g in set(decide.TEST_GROUPS.values())})


def _flip(run, default):
    return next(d for d in decide.decide(run) if d["default"] == default)["flip_to"]


def test_decide_flips_a_clear_win_and_takes_the_fastest():
    m = {"attention_bwd.base.documents.fwd_bwd": _m(4.0), "attention_bwd.base.mixed.fwd_bwd": _m(2.8),
         "attention_bwd.even.documents.fwd_bwd": _m(3.8), "attention_bwd.even.mixed.fwd_bwd": _m(2.7),
         "attention_bwd.fused.documents.fwd_bwd": _m(3.5), "attention_bwd.fused.mixed.fwd_bwd": _m(2.5)}
    run = _run(m)
    assert _flip(run, "attention bwd") == "fused"
    assert _flip(run, "attention fwd") is None  # nothing measured there
    text = decide.report(run)
    assert "FLIP the default to fused" in text and '"bwd": "fused"' in text


def test_decide_needs_every_metric_of_the_row():
    # fused wins on documents but loses on the mixed mask: keep
    m = {"attention_bwd.base.documents.fwd_bwd": _m(4.0), "attention_bwd.base.mixed.fwd_bwd": _m(2.8),
         "attention_bwd.fused.documents.fwd_bwd": _m(3.5), "attention_bwd.fused.mixed.fwd_bwd": _m(2.9)}
    assert _flip(_run(m), "attention bwd") is None


@pytest.mark.parametrize("cand, why", [
    (_m(0.99), "under the 3% threshold"),
    (_m(0.95, spread=0.05), "noisy: ranges overlap"),
    (_m(0.90, timer="events"), "different timers"),
])
def test_decide_keeps_the_default_when_the_win_is_not_clear(cand, why):
    run = _run({"masked_patch_loss.cuda.v1": _m(1.0), "masked_patch_loss.cuda.v2": cand})
    assert _flip(run, "masked_patch_loss cuda") is None, why


def test_decide_requires_gate_tests_that_passed():
    m = {"masked_token_loss.v1": _m(36.0, timer="events"), "masked_token_loss.v3": _m(33.0, timer="events")}
    ok = dict(passed=3, failed=0, skipped=0)
    assert _flip(_run(m, {"masked_token_loss": ok}), "masked_token_loss") == "v3"
    assert _flip(_run(m, {"masked_token_loss": dict(ok, failed=1)}), "masked_token_loss") is None
    assert _flip(_run(m, {"masked_token_loss": dict(passed=0, failed=0, skipped=9)}), "masked_token_loss") is None
    assert _flip(_run(m, {}), "masked_token_loss") is None


def test_decide_reads_a_run_folder(tmp_path):
    """The collecting half: junit XML, the sweeps' JSON and harness reports become metric keys and test counts."""
    res = tmp_path / "results"
    res.mkdir()
    (tmp_path / "summary.tsv").write_text("step\tbudget_s\tused_s\tcpu_s\trc\tstatus\tnote\n"
                                          "a gate_tests\t70\t50\t40\t0\tok\t\n")
    (res / "gate_tests.xml").write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.moca_kernels.losses.test_masked_patch_loss" name="test_gpu_x"/>'
        '<testcase classname="tests.moca_kernels.losses.test_masked_patch_loss" name="test_gpu_y"/>'
        '<testcase classname="tests.moca_kernels.attention.test_backward_variants" name="t">'
        '<failure message="boom"/></testcase>'
        '</testsuite></testsuites>')
    (res / "attention_bwd.json").write_text(json.dumps(dict(device="NVIDIA H100 80GB HBM3", rows=[
        dict(variant="base", timings={"documents.fwd_bwd": _m(4.0, timer="events")}),
        dict(variant="fused", timings={"documents.fwd_bwd": _m(3.0, timer="events")})])))
    (res / "masked_patch_loss_N262144_P1176.json").write_text(json.dumps(dict(
        title="masked_patch_loss fwd+bwd", device="NVIDIA H100 80GB HBM3", shape={}, results=[
            dict(name="moca cuda v1", **_m(1.0)), dict(name="moca cuda v2", **_m(0.8)),
            dict(name="moca cuda v2: forward only, no grad", **_m(0.3)),
            dict(name="moca cuda v2p", median_ms=None, error="x")])))
    (res / "attention_7B-text_documents_fwd_bwd.json").write_text(json.dumps(dict(
        title="masked_attention 7B-text documents fwd+bwd", device="NVIDIA H100 80GB HBM3", shape={}, results=[
            dict(name="moca triton", **_m(5.0, timer="events")), dict(name="FlexAttention (compiled)", **_m(6.0)),
            dict(name="torch varlen_attn", **_m(5.4)), dict(name="SDPA flash, unmasked T (more work)", **_m(4.0))])))
    run = decide.collect(tmp_path)
    assert {k for k in run["metrics"] if k.startswith("attention.")} == {
        "attention.7B-text.documents.fwd_bwd.moca", "attention.7B-text.documents.fwd_bwd.flex",
        "attention.7B-text.documents.fwd_bwd.varlen"}
    # the target compares with the better peer (varlen here): 5.4 / 5.0 = 1.08x, under 1.10x
    assert "7B-text documents fwd+bwd vs the better of Flex and varlen: 1.08x" in "\n".join(decide.targets(run))
    assert run["tests"]["masked_patch_loss"] == dict(passed=2, failed=0, skipped=0)
    assert run["tests"]["attention_bwd"]["failed"] == 1
    assert run["metrics"]["attention_bwd.fused.documents.fwd_bwd"]["median_ms"] == 3.0
    assert set(k for k in run["metrics"] if k.startswith("masked_patch_loss")) == {
        "masked_patch_loss.cuda.v1", "masked_patch_loss.cuda.v2"}
    assert _flip(run, "masked_patch_loss cuda") == "v2"
    assert _flip(run, "attention bwd") is None  # its gate test failed
    out = tmp_path / "run.json"
    assert decide.main([str(tmp_path), "--write", str(out)]) == 0
    assert json.loads(out.read_text())["decisions"][2]["flip_to"] == "v2"
    assert decide.main([str(out)]) == 0


def test_timer_plan():
    # sub-GRAPH_BELOW_MS calls: CUDA graphs, or (graphs off / capture failed) enough event-timed calls
    timer, calls = timer_plan(0.5, rep=30)
    assert timer == "cudagraph" and calls >= 25
    timer, calls = timer_plan(0.5, rep=30, graphs=False)
    assert timer == "events" and calls >= MIN_EVENT_REPS and calls * 0.5 >= MIN_EVENT_MS
    assert timer_plan(GRAPH_BELOW_MS * 2, rep=30) == ("events", 30)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_run_gpu_branch_commands(tmp_path):
    """The GPU branch cannot run here; GPU_RUN_DRY=1 writes each step's command instead, with a stand-in ncu on
    PATH so that step i takes its ncu branch: the commands must be the GPU ones (no --smoke, the headline sweeps,
    the gate files first and left out of the full suite, h given the time left, one ncu launch set per target)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "ncu").write_text("#!/bin/sh\nexit 0\n")
    (stub / "ncu").chmod(0o755)
    work = tmp_path / "work"
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_RUN_WORK=str(work), PYTHONPATH=str(ROOT),
               PYTHON=sys.executable, GPU_RUN_DRY="1", PATH=f"{stub}{os.pathsep}{os.environ['PATH']}")
    env.pop("GPU_RUN_SMOKE", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_run.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [line.split("\t") for line in (work / "summary.tsv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == STEPS
    budgets = {r[0]: int(r[1]) for r in rows}
    fixed = sum(b for name, b in budgets.items() if not name.startswith("h "))
    assert fixed <= 415, budgets
    # h gets 420 s minus the time already used (none in a dry run) minus i's 35 s: the run ends by 420 s
    assert 380 <= budgets["h full_tests"] <= 420 - budgets["i ncu"], budgets
    logs = {p.stem: p.read_text() for p in (work / "logs").glob("*.log")}
    assert all("--smoke" not in cmd for cmd in logs.values()), logs
    assert "MOCA_KERNELS_SKIP_CUDA_BUILD=1" in logs["setup"] and "_ext.available()" in logs["setup"]
    gate = logs["a_gate_tests"]
    assert "-m gpu" in gate and "test_forward_variants.py" in gate and "test_masked_token_loss_variants.py" in gate
    assert "--ignore=tests/moca_kernels/attention/test_forward_variants.py" in logs["h_full_tests"]
    assert "--sweep 4096 16384 65536 262144" in logs["g1_sweep_nce"]
    assert "--chunks 32 48 64" in logs["g2_sweep_mtl"]
    assert "--profile" in logs["d_mtl"] and "--json" in logs["b_attn_bwd"] and "--json" in logs["e_attn_fwd"]
    ncu = logs["i_ncu"]
    assert ncu.count("ncu\\ --clock-control\\ none") == 2 and "WarpStateStats" in ncu and "attention_bwd" in ncu
