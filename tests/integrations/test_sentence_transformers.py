"""moca_kernels.integrations.sentence_transformers against the sentence-transformers losses it stands in for.

InfoNCELoss / CachedInfoNCELoss vs MultipleNegativesRankingLoss / CachedMultipleNegativesRankingLoss on the same
batch of a tiny BERT (built from config, dropout on): the loss and every parameter gradient, with 0, 1 and 2 hard
negative columns; gradient accumulation and loss scaling through the cached loss's backward hook (issue 12 item 2:
a loss built on ``GradCache.step`` could not be back-propagated by a trainer, and the obvious workaround doubled
the gradient at accumulation 2); hard negatives in sentence-transformers' column order (item 3); a few
SentenceTransformerTrainer steps, ours against theirs.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")

from sentence_transformers import util as st_util  # noqa: E402

from tests.integrations._st_models import sentences, tiny_bert_dir, tiny_sentence_transformer  # noqa: E402

try:
    from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
        CachedMultipleNegativesRankingLoss as CMNRL, MultipleNegativesRankingLoss as MNRL)
except ImportError:  # sentence-transformers < 6
    from sentence_transformers.losses import (  # noqa: E402
        CachedMultipleNegativesRankingLoss as CMNRL, MultipleNegativesRankingLoss as MNRL)

import moca_kernels as mk  # noqa: E402
from moca_kernels.integrations.sentence_transformers import CachedInfoNCELoss, InfoNCELoss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


B = 6


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("st"), dropout=0.1)


@pytest.fixture(scope="module")
def model64(bert_dir):
    m = tiny_sentence_transformer(bert_dir, torch.float64)
    m.train()
    return m


def features(model, n_columns, seed=0, n=B):
    tok = model.preprocess if hasattr(model, "preprocess") else model.tokenize
    return [tok(sentences(n, 100 * seed + c)) for c in range(n_columns)]


def run(model, loss, feats, seed=1, scale=1.0):
    """loss(feats) and every parameter's gradient of scale * loss (same dropout draws for every call)."""
    model.zero_grad(set_to_none=True)
    for p in loss.parameters():
        p.grad = None
    torch.manual_seed(seed)
    value = loss([dict(f) for f in feats], None)
    (scale * value).backward()
    params = dict(model.named_parameters())
    params.update((n, p) for n, p in loss.named_parameters() if not n.startswith("model."))  # log_temperature
    return value.detach(), {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}


def worst_gradient_error(ours, ref):
    """max over parameters of max|ours - ref| / max|ref| (the floor: 1e-6 of the largest gradient, for
    gradients that are zero in exact arithmetic, e.g. BERT's key bias)."""
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    floor = 1e-6 * max(g.abs().max().item() for g in ref.values())
    return max((ours[n] - ref[n]).abs().max().item() / max(ref[n].abs().max().item(), floor) for n in ref)


@pytest.mark.parametrize("negatives", [0, 1, 2])
@pytest.mark.parametrize("cached", [False, True])
def test_loss_and_every_gradient_equal_mnrl(model64, negatives, cached):
    feats = features(model64, 2 + negatives, seed=negatives)
    if cached:   # chunks of 4 rows: 6 rows per column -> chunks of 4 and 2
        ours, ref = CachedInfoNCELoss(model64, 20.0, mini_batch_size=4), CMNRL(model64, 20.0, mini_batch_size=4)
    else:
        ours, ref = InfoNCELoss(model64, scale=20.0), MNRL(model64, scale=20.0)
    la, ga = run(model64, ours, feats)
    lb, gb = run(model64, ref, feats)
    assert la.dtype == torch.float64 and la.requires_grad is False
    assert abs(la.item() - lb.item()) < 1e-12 * max(1.0, abs(lb.item()))
    assert worst_gradient_error(ga, gb) < 1e-9


def test_float32_and_temperature_is_one_over_scale(bert_dir):
    model = tiny_sentence_transformer(bert_dir, torch.float32)
    model.train()
    feats = features(model, 3, seed=7)
    la, ga = run(model, CachedInfoNCELoss(model, temperature=0.05, mini_batch_size=2), feats)
    lb, gb = run(model, CMNRL(model, scale=20.0, mini_batch_size=2), feats)
    assert abs(la.item() - lb.item()) < 1e-5
    assert worst_gradient_error(ga, gb) < 1e-4


def test_symmetric_equals_mnrl_per_direction(model64):
    feats = features(model64, 3, seed=3)
    la, ga = run(model64, InfoNCELoss(model64, symmetric=True), feats)
    lb, gb = run(model64, MNRL(model64, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
                 feats)
    assert abs(la.item() - lb.item()) < 1e-12
    assert worst_gradient_error(ga, gb) < 1e-9


def test_dot_score_similarity(model64):
    feats = features(model64, 2, seed=4)
    la, ga = run(model64, CachedInfoNCELoss(model64, 1.0, st_util.dot_score, 4), feats)
    lb, gb = run(model64, CMNRL(model64, 1.0, st_util.dot_score, 4), feats)
    assert abs(la.item() - lb.item()) < 1e-12
    assert worst_gradient_error(ga, gb) < 1e-9


def _own_scope_reference(q, d_cols, t):
    """float64 loop: query i against every positive and its own negatives only."""
    q = torch.nn.functional.normalize(q, dim=1)
    d_cols = [torch.nn.functional.normalize(d, dim=1) for d in d_cols]
    pos, negs = d_cols[0], d_cols[1:]
    terms = []
    for i in range(q.shape[0]):
        cand = torch.cat([pos] + [n[i:i + 1] for n in negs])
        s = cand @ q[i] / t
        terms.append(torch.logsumexp(s, 0) - s[i])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("cached", [False, True])
def test_own_scope_pairs_each_query_with_its_own_column_negatives(model64, cached):
    """Item 3: s-t passes negatives as columns; "own" must score query i against negative_r[i] only."""
    feats = features(model64, 4, seed=5)
    loss = (CachedInfoNCELoss(model64, mini_batch_size=4, hard_negative_scope="own") if cached
            else InfoNCELoss(model64, hard_negative_scope="own"))
    model64.train(not cached)   # chunked embedding draws other dropout masks than one merged forward: none
    try:
        la, ga = run(model64, loss, feats)
        # reference: the same embeddings (same dropout draws), the loss by the loop above
        model64.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        from moca_kernels.integrations.sentence_transformers import _embed_columns

        emb = _embed_columns(model64, [dict(f) for f in feats])
        ref = _own_scope_reference(emb[0], emb[1:], 0.05)
        ref.backward()
        gb = {n: p.grad.detach().clone() for n, p in model64.named_parameters() if p.grad is not None}
    finally:
        model64.train()
    assert abs(la.item() - ref.item()) < 1e-12
    assert worst_gradient_error(ga, gb) < 1e-9
    # and it differs from the "batch" scope on this batch (the test can tell the two apart)
    assert abs(run(model64, InfoNCELoss(model64), feats)[0].item() - la.item()) > 1e-3


def test_learnable_temperature_gradient_cached_equals_plain(model64):
    feats = features(model64, 3, seed=6)
    model64.eval()   # chunked (cached) and merged (plain) embedding draw different dropout masks: none here
    try:
        _learnable_temperature(model64, feats)
    finally:
        model64.train()


def _learnable_temperature(model64, feats):
    la, ga = run(model64, CachedInfoNCELoss(model64, mini_batch_size=4, learnable_temperature=True, scale=10.0),
                 feats, scale=0.5)
    lb, gb = run(model64, InfoNCELoss(model64, learnable_temperature=True, scale=10.0), feats, scale=0.5)
    assert "log_temperature" in ga and ga["log_temperature"].abs().item() > 1e-6
    assert abs(la.item() - lb.item()) < 1e-12
    assert worst_gradient_error(ga, gb) < 1e-9
    # d loss / d log t = t * d loss / d t, checked against a central difference of the plain loss in t
    loss = InfoNCELoss(model64, temperature=0.1)
    emb = None

    def value(t):
        nonlocal emb
        loss._temperature = t
        torch.manual_seed(1)
        with torch.no_grad():
            return loss([dict(f) for f in feats], None).item()
    h = 1e-6
    numeric = 0.1 * (value(0.1 + h) - value(0.1 - h)) / (2 * h)
    assert abs(gb["log_temperature"].item() / 0.5 - numeric) < 1e-6


def test_accumulation_and_loss_scaling_reach_the_second_pass(model64):
    """Item 2. The cached loss's second pass runs from its backward, with the trainer's factor: accumulating
    loss(b1) / 2 and loss(b2) / 2 gives (g(b1) + g(b2)) / 2 of the plain loss; with b1 = b2 that is the
    gradient at accumulation 1. GradCache.step inside a loss (the old workaround) gives twice that."""
    f1, f2 = features(model64, 3, seed=8), features(model64, 3, seed=9)
    model64.eval()   # chunked (cached) and merged (plain) embedding draw different dropout masks: none here
    try:
        _accumulation(model64, f1, f2)
    finally:
        model64.train()


def _accumulation(model64, f1, f2):
    plain, cached = InfoNCELoss(model64), CachedInfoNCELoss(model64, mini_batch_size=4)
    _, g1 = run(model64, plain, f1)
    _, g2 = run(model64, plain, f2, seed=2)

    def accumulate(loss, batches):
        model64.zero_grad(set_to_none=True)
        for f, seed in batches:
            torch.manual_seed(seed)
            (loss([dict(x) for x in f], None) / len(batches)).backward()
        return {n: p.grad.detach().clone() for n, p in model64.named_parameters() if p.grad is not None}

    mean = {n: (g1[n] + g2[n]) / 2 for n in g1}
    assert worst_gradient_error(accumulate(cached, [(f1, 1), (f2, 2)]), mean) < 1e-9
    assert worst_gradient_error(accumulate(cached, [(f1, 1), (f1, 1)]), g1) < 1e-9

    class StepInsideLoss(torch.nn.Module):   # the workaround issue 12 reports: backward inside forward
        def __init__(self):
            super().__init__()
            self.inner = InfoNCELoss(model64)

        def forward(self, feats, labels):
            cache = mk.GradCache(lambda f: model64(f)["sentence_embedding"],
                                 lambda *e: self.inner.compute_loss_from_embeddings(list(e)), chunk_sizes=4,
                                 split_fn=lambda f, s: [(f,)])
            return cache.step(*feats).requires_grad_()

    doubled = accumulate(StepInsideLoss(), [(f1, 1), (f1, 1)])
    assert abs(doubled["0.model.embeddings.LayerNorm.bias"] - 2 * g1["0.model.embeddings.LayerNorm.bias"]).max() \
        < 1e-9 * g1["0.model.embeddings.LayerNorm.bias"].abs().max()


def test_evaluation_under_no_grad_runs_one_pass(model64):
    feats = features(model64, 2, seed=10)
    calls = []
    handle = model64[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        torch.manual_seed(1)
        with torch.no_grad():
            value = CachedInfoNCELoss(model64, mini_batch_size=4)([dict(f) for f in feats], None)
    finally:
        handle.remove()
    assert not value.requires_grad and math.isfinite(value.item())
    assert len(calls) == 4   # 2 columns x 2 chunks, no second pass


def test_bad_arguments_raise_naming_them(model64):
    with pytest.raises(ValueError, match="not both"):
        InfoNCELoss(model64, scale=20.0, temperature=0.05)
    with pytest.raises(ValueError, match="scale"):
        InfoNCELoss(model64, scale=0.0)
    with pytest.raises(ValueError, match="similarity_fct"):
        InfoNCELoss(model64, similarity_fct=st_util.manhattan_sim)
    with pytest.raises(ValueError, match="hard_negative_scope"):
        CachedInfoNCELoss(model64, hard_negative_scope="mine")
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedInfoNCELoss(model64, mini_batch_size=0)
    with pytest.raises(ValueError, match="at least 2"):
        InfoNCELoss(model64)(features(model64, 1), None)


def test_importing_moca_kernels_does_not_import_the_integration():
    import subprocess
    import sys

    code = ("import sys, moca_kernels; "
            "print(any(m.startswith('moca_kernels.integrations.') or m == 'sentence_transformers' "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------------------------------
# SentenceTransformerTrainer: a few steps with ours equal the same steps with theirs.
# ------------------------------------------------------------------------------------------------------------


def train(bert_dir, tmp_path, make_loss, accumulation, steps=3, batch=4, negatives=1):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = tiny_sentence_transformer(bert_dir, torch.float32)
    n = steps * accumulation * batch
    columns = {"anchor": sentences(n, 1), "positive": sentences(n, 2)}
    for r in range(negatives):
        columns[f"negative_{r + 1}"] = sentences(n, 3 + r)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, seed=3, data_seed=3,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(columns),
                                         loss=make_loss(model))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "grad_norm" in h]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, logs


def test_trainer_steps_equal_cmnrl(bert_dir, tmp_path):
    """3 SGD steps (SGD: unlike Adam, a doubled gradient doubles the step), gradient accumulation 2, one hard
    negative column, chunks of 3 rows: weights, logged losses and grad norms equal CMNRL's."""
    ours, ours_logs = train(bert_dir, tmp_path, lambda m: CachedInfoNCELoss(m, mini_batch_size=3), 2)
    ref, ref_logs = train(bert_dir, tmp_path, lambda m: CMNRL(m, mini_batch_size=3), 2)
    init = {k: v for k, v in tiny_sentence_transformer(bert_dir).state_dict().items()}
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref)
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    assert moved > 1e-3 and worst < 1e-4 * moved, (worst, moved)
    assert len(ours_logs) == len(ref_logs) == 3
    for a, b in zip(ours_logs, ref_logs):
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * b["grad_norm"]
        assert abs(a["loss"] - b["loss"]) < 1e-4 * b["loss"]


# ------------------------------------------------------------------------------------------------------------
# The README's snippet runs as written (the tiny BERT in place of the downloaded MiniLM).
# ------------------------------------------------------------------------------------------------------------


def readme_snippet() -> str:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("### sentence-transformers\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_trains(bert_dir, tmp_path, monkeypatch):
    code = readme_snippet()
    name = '"sentence-transformers/all-MiniLM-L6-v2"'
    assert name in code, "the snippet's model line changed: update this test"
    monkeypatch.chdir(tmp_path)            # the trainer's default output_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scope: dict = {}
    exec(compile(code.replace(name, repr(bert_dir)), "README.md:sentence-transformers", "exec"), scope)
    model = scope["model"]
    init = tiny_sentence_transformer(bert_dir).state_dict()
    moved = max((v - init[k]).abs().max().item() for k, v in model.state_dict().items())
    assert isinstance(scope["loss"], CachedInfoNCELoss) and moved > 1e-6
