"""tuning.py (settings, override, the one tuner and cache) and the variant spelling of dispatch.py
(``backend:variant`` in impl= and MOCA_KERNELS_IMPL); the environment is read in tuning.py and dispatch.py only,
and the README lists every variable read."""

import re
from pathlib import Path

import pytest
import torch

import moca_kernels as mk
from moca_kernels import dispatch, tuning
from moca_kernels.dispatch import Backend, BackendUnavailable, Op, variant_backends

ROOT = Path(__file__).resolve().parents[2]


# --- settings and override ------------------------------------------------------------------------------


def test_setting_comes_from_override_then_environment_then_default(monkeypatch):
    monkeypatch.delenv("MOCA_ATTENTION_MIN_DKDV_PROGRAMS", raising=False)
    assert tuning.get("attention_min_dkdv_programs") == 3
    monkeypatch.setenv("MOCA_ATTENTION_MIN_DKDV_PROGRAMS", " 5 ")
    assert tuning.get("attention_min_dkdv_programs") == 5          # read at the call, not at import
    with tuning.override(attention_min_dkdv_programs=7):
        assert tuning.get("attention_min_dkdv_programs") == 7
        with tuning.override(attention_min_dkdv_programs=None):     # None: the default, hiding the variable
            assert tuning.get("attention_min_dkdv_programs") == 3
        assert tuning.get("attention_min_dkdv_programs") == 7
    assert tuning.get("attention_min_dkdv_programs") == 5


def test_override_is_undone_when_the_block_raises():
    with pytest.raises(KeyError):
        with tuning.override(autotune=False):
            assert not tuning.autotune_enabled()
            raise KeyError
    assert tuning._OVERRIDES == []


@pytest.mark.parametrize("var,value", [("MOCA_KERNELS_AUTOTUNE", "no"), ("MOCA_ATTENTION_TUNE", "-1"),
                                       ("MOCA_ATTENTION_DQ", "fast"), ("MOCA_ATTENTION_TILES", "128"),
                                       ("MOCA_ATTENTION_MIN_DKDV_PROGRAMS", "0"), ("MOCA_MTL_BWD_GEMM", "cublas")])
def test_a_value_that_does_not_parse_raises_naming_the_variable(var, value, monkeypatch):
    monkeypatch.setenv(var, value)
    name = next(s.name for s in tuning.SETTINGS.values() if s.env == var)
    with pytest.raises(ValueError, match=f"{var}={value!r}"):
        tuning.get(name)


def test_unknown_override_raises():
    with pytest.raises(ValueError, match="unknown setting.*'tiles'"):
        with tuning.override(tiles=3):
            pass


def test_attention_tune_limits_the_candidates_of_every_attention_kernel(monkeypatch):
    from moca_kernels.attention import tiles

    cuda = torch.device("cuda")   # candidate lists only: nothing runs on it
    full = tiles.candidates("dkdv", torch.bfloat16, 128, cuda)
    assert len(full) == 3
    monkeypatch.setenv("MOCA_ATTENTION_TUNE", "2")
    assert tiles.candidates("dkdv", torch.bfloat16, 128, cuda) == full[:2]
    assert len(tiles.fused_candidates(torch.bfloat16, 128, cuda)) == 2
    assert len(tiles.fwd_desc_candidates("ws", torch.bfloat16, 128, cuda, 128)) == 2
    monkeypatch.setenv("MOCA_ATTENTION_TUNE", "0")
    assert tiles.candidates("dkdv", torch.bfloat16, 128, cuda) == full[:1]
    with tuning.override(attention_tune=None, autotune=False):   # autotuning off: the first only
        assert tiles.candidates("dq", torch.bfloat16, 128, cuda) == \
            tiles.all_candidates("dq", torch.bfloat16, 128, cuda)[:1]


# --- the tuner ------------------------------------------------------------------------------------------


def test_pick_takes_the_first_candidate_untimed_without_autotuning_and_caches_it():
    launched = []
    with tuning.override(autotune=False):
        assert tuning.pick(("toy", 1), ["a", "b"], launched.append) == "a"
    assert launched == [] and tuning.CACHE[("toy", 1)] == "a"
    assert tuning.pick(("toy", 1), ["b"], launched.append) == "a"    # cached: never re-decided
    tuning.clear()
    assert ("toy", 1) not in tuning.CACHE


def test_pick_times_every_candidate_skips_failures_and_keeps_the_fastest(monkeypatch):
    import triton.testing

    monkeypatch.setattr(tuning, "interpret", lambda: False)
    times = {"slow": 3.0, "fast": 1.0, "broken": None}

    def fake_bench(fn, warmup, rep):
        fn()
        return times[seen[-1]]

    def launch(cfg):
        seen.append(cfg)
        if cfg == "broken":
            raise RuntimeError("out of shared memory")

    seen = []
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    with tuning.override(autotune=True):
        assert tuning.pick(("toy", 2), ["slow", "broken", "fast"], launch) == "fast"
        with pytest.raises(RuntimeError, match="out of shared memory"):   # all fail: the first error
            tuning.pick(("toy", 3), ["broken"] * 2, launch)
    tuning.clear()


def test_clear_runs_the_registered_hooks():
    cleared = []
    hook = tuning.on_clear(lambda: cleared.append(1))
    try:
        tuning.clear()
        assert cleared == [1]
    finally:
        tuning._CLEAR_HOOKS.remove(hook)


# --- variant spelling -----------------------------------------------------------------------------------


def toy_op(calls):
    def make_run(variant):
        return lambda **inputs: calls.append(dict(variant)) or dict(variant)

    def v2_reasons(x):
        return [] if x >= 0 else [f"x = {x} is negative; v2 takes x >= 0"]

    return Op("toy", [
        *variant_backends("triton", {"fwd": {"v1": None, "v2": v2_reasons}, "bwd": {"v1": None, "fast": None}},
                          {"fwd": "v1", "bwd": "v1"}, lambda x: [], make_run),
        Backend("torch", lambda x: [], lambda x: "torch"),
    ])


def test_spellings_and_resolution():
    op = toy_op([])
    assert op.spellings() == ["triton", "triton:fast", "triton:v2", "triton:v2+fast", "torch"]
    assert op.resolve("triton:v2").variant == {"fwd": "v2", "bwd": "v1"}      # v2: only fwd offers it
    assert op.resolve("triton:v1").variant == {"fwd": "v1", "bwd": "v1"}      # v1: both parts, the default
    assert op.resolve(" triton : fast + fwd.v2 ").spelling == "triton:v2+fast"
    for bad, match in (("triton:v3", "unknown kernel variant 'v3'"), ("triton:fwd.fast", "'fwd.fast'"),
                       ("triton:v2+fwd.v1", "two variants for the fwd kernel"), ("torch:v2", "no kernel variants"),
                       ("cudnn", "impl must be one of")):
        with pytest.raises(ValueError, match=match):
            op.resolve(bad)
    with pytest.raises(BackendUnavailable, match="no 'cuda' backend.*triton:v2"):
        op.resolve("cuda:v2")


def test_automatic_dispatch_takes_only_the_default_variant():
    calls = []
    op = toy_op(calls)
    assert op(x=1) == {"fwd": "v1", "bwd": "v1"}
    assert op(impl="triton:fast", x=1) == {"fwd": "v1", "bwd": "fast"}


def test_forced_variant_that_cannot_run_raises_its_reasons_and_runs_nothing():
    calls = []
    op = toy_op(calls)
    with pytest.raises(BackendUnavailable, match="backend 'triton:v2' cannot take these inputs: x = -1 is neg"):
        op(impl="triton:v2", x=-1)
    assert calls == []
    assert op(x=-1) == {"fwd": "v1", "bwd": "v1"}    # the default needs nothing of v2's


def test_env_var_spells_variants_per_op_only(monkeypatch):
    op = toy_op([])
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "other=torch, toy=triton:fwd.v2+fast")
    assert op(x=1) == {"fwd": "v2", "bwd": "fast"}
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "triton:v2")
    with pytest.raises(ValueError, match="a variant only per op"):
        op(x=1)
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "toy=gpu:v2")
    with pytest.raises(ValueError, match="cannot read 'toy=gpu:v2'"):
        op(x=1)


def test_internal_ops_follow_a_single_env_backend_only_when_they_have_it(monkeypatch):
    internal = Op("meta", [Backend("cuda", lambda: ["no extension"], lambda: "cuda"),
                           Backend("torch", lambda: [], lambda: "torch")], global_env=False)
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "triton")
    assert internal() == "torch"
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "cuda")
    with pytest.raises(BackendUnavailable, match="no extension"):
        internal()


@pytest.mark.parametrize("var", sorted(dispatch.REMOVED_ENV_VARS))
def test_removed_variant_variables_raise_naming_the_new_spelling(var, monkeypatch):
    monkeypatch.setenv(var, "v2")
    with pytest.raises(ValueError, match=f"{var} was removed.*MOCA_KERNELS_IMPL="):
        toy_op([])(x=1)


def test_attention_metadata_builders_go_through_op():
    """impl= on the metadata builders is dispatched like every op: cuda without the extension / a GPU raises
    its reasons; torch builds the same tables."""
    from moca_kernels.attention import metadata

    mask = mk.AttentionMask.from_seqlens([5, 9], causal=True)
    if not (torch.cuda.is_available() and mk._ext.available()):
        with pytest.raises(BackendUnavailable, match="attention_row_spans: backend 'cuda' cannot take"):
            metadata.row_spans(mask.cu_seqlens, mask.block_ids, 14, True, impl="cuda")
        with pytest.raises(BackendUnavailable, match="attention_tile_tables: backend 'cuda'"):
            metadata.tile_tables(mask.spans, 16, 16, impl="cuda")
    spans = metadata.row_spans(mask.cu_seqlens, mask.block_ids, 14, True, impl="torch")
    assert torch.equal(spans, mask.spans.cpu())
    assert torch.equal(metadata.tile_tables(spans, 16, 16, impl="torch"), metadata.tile_tables(spans, 16, 16))


def test_attention_forced_variant_without_the_interpreter_raises_its_reasons(monkeypatch):
    """CPU tensors without TRITON_INTERPRET: every triton variant refuses with the backend's reason."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mask = mk.AttentionMask.from_seqlens([8])
    q = torch.randn(8, 2, 16)
    for impl in ("triton:ws", "triton:fused", "triton:tma+even"):
        with pytest.raises(BackendUnavailable, match=f"'{re.escape(impl)}' cannot take.*TRITON_INTERPRET=1"):
            mk.masked_attention(q, q, q, mask, impl=impl)
    assert mk.masked_attention(q, q, q, mask).shape == q.shape   # automatic: the torch backend


# --- the environment: read in two modules only, each variable in the README ------------------------------


def test_the_library_reads_the_environment_in_tuning_and_dispatch_only():
    readers = []
    for path in sorted((ROOT / "moca_kernels").rglob("*.py")):
        text = path.read_text()
        if re.search(r"os\.environ|os\.getenv|getenv\(", text):
            readers.append(path.relative_to(ROOT).as_posix())
    assert readers == ["moca_kernels/dispatch.py", "moca_kernels/tuning.py"], readers


def test_readme_lists_every_variable_the_library_reads():
    readme = (ROOT / "README.md").read_text()
    names = [s.env for s in tuning.SETTINGS.values() if s.env] + ["MOCA_KERNELS_IMPL", "TRITON_INTERPRET"]
    missing = [n for n in names if f"| `{n}" not in readme]
    assert not missing, f"README does not list {missing}"
    dispatch_text = (ROOT / "moca_kernels" / "dispatch.py").read_text()
    tuning_text = (ROOT / "moca_kernels" / "tuning.py").read_text()
    read = set(re.findall(r"\"(MOCA_[A-Z0-9_]+|TRITON_[A-Z_]+)\"", tuning_text + dispatch_text))
    read -= set(dispatch.REMOVED_ENV_VARS)   # only read to refuse them
    assert read <= set(names), read - set(names)
