"""MocaEmbedder under the conventions of the tools people evaluate with (issue 12): ``encode`` as
sentence-transformers users call it (sentences, prompt=, batch_size=, convert_to_numpy=, normalize_embeddings=),
today's keyword API unchanged, and MTEB's encoder protocol: ``mteb.evaluate`` runs the model unmodified on local
tiny tasks built here (no downloads), with the scores our own embeddings give. Also item 10: a bad ``pooling``
fails before any weights load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moca.embedding import MocaEmbedder

pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = ["a large red circle above a small blue square", "two green triangles", "a blue square on the left",
         "three yellow dots in a row", "a purple star under a circle"]


@pytest.fixture(scope="module")
def model():
    return MocaEmbedder.tiny(seed=0, image_size=56)


def test_sentence_transformers_style_encode_equals_the_keyword_api(model):
    ref = model.encode(texts=TEXTS, instruction="Find an image: ", batch_size=2)
    out = model.encode(TEXTS, prompt="Find an image: ", batch_size=3, convert_to_numpy=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == tuple(ref.shape)
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(model.encode(sentences=TEXTS, prompt="Find an image: ", convert_to_tensor=True), ref,
                          rtol=1e-5, atol=1e-6)
    model.prompts = {"query": "Find an image: "}
    try:
        assert torch.allclose(model.encode(TEXTS, prompt_name="query"), ref, rtol=1e-5, atol=1e-6)
    finally:
        model.prompts = {}
    raw = model.encode(TEXTS, normalize_embeddings=False, show_progress_bar=False)
    norms = raw.norm(dim=-1)
    assert (norms - 1).abs().min() > 1e-3                     # really not normalised
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), model.encode(TEXTS), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(model.similarity(out, out), ref @ ref.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.similarity_pairwise(out, out), torch.ones(len(TEXTS)), rtol=1e-5, atol=1e-6)


def test_sentence_transformers_style_mistakes_raise(model):
    with pytest.raises(TypeError, match="instruction / prompt"):
        model.encode(TEXTS, prompt="a", instruction="b")
    with pytest.raises(ValueError, match="prompt_name='query'"):
        model.encode(TEXTS, prompt_name="query")
    with pytest.raises(TypeError, match="convert_to_numpyy"):
        model.encode(TEXTS, convert_to_numpyy=True)
    with pytest.raises(ValueError, match="precision"):
        model.encode(TEXTS, precision="int8")
    with pytest.raises(TypeError, match="not both"):
        model.encode(TEXTS, sentences=TEXTS)


def test_bad_pooling_fails_before_the_weights_load(monkeypatch, tmp_path):
    """Item 10: from_pretrained(pooling="cls") used to load the whole checkpoint, then refuse."""
    import moca.embedding as emb

    def no_loading(*a, **k):
        raise AssertionError("weights loaded before the pooling was checked")

    monkeypatch.setattr(emb.MocaBackbone, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="pooling must be one of"):
        MocaEmbedder.from_pretrained(tmp_path, pooling="cls")


# ------------------------------------------------------------------------------------------------------------
# MTEB: local tiny tasks, evaluated by mteb itself.
# ------------------------------------------------------------------------------------------------------------


def _images(n, seed=0):
    from PIL import Image

    g = np.random.default_rng(seed)
    return [Image.fromarray(g.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(n)]


def _task(kind: str):
    mteb = pytest.importorskip("mteb", reason="mteb is not installed")
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    n = len(TEXTS)
    queries = Dataset.from_dict({"id": [f"q{i}" for i in range(n)], "text": TEXTS})
    if kind == "t2i":
        corpus = Dataset.from_dict({"id": [f"d{i}" for i in range(n)], "image": _images(n)})
    else:
        corpus = Dataset.from_dict({"id": [f"d{i}" for i in range(n)],
                                    "text": [t[::-1] + " " + t.split()[-1] for t in TEXTS]})
    relevant = {f"q{i}": {f"d{i}": 1} for i in range(n)}

    class Tiny(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=f"MocaTiny{kind.upper()}", description="a local test task", reference=None,
            dataset={"path": "local/none", "revision": "none"},
            type="Any2AnyRetrieval" if kind == "t2i" else "Retrieval",
            category=kind, modalities=["image", "text"] if kind == "t2i" else ["text"], eval_splits=["test"],
            eval_langs=["eng-Latn"], main_score="ndcg_at_10", date=None, domains=None, task_subtypes=None,
            license=None, annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation="")

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = {"default": {"test": RetrievalSplitData(queries=queries, corpus=corpus,
                                                                   relevant_docs=relevant, top_ranked=None)}}
            self.data_loaded = True

    return mteb, Tiny(), queries, corpus


@pytest.mark.parametrize("kind", ["t2t", "t2i"])
def test_mteb_evaluates_the_model_unmodified(model, kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mteb, task, queries, corpus = _task(kind)
    model.prompts = {f"{task.metadata.name}-query": "Find the match: "}
    try:
        result = mteb.evaluate(model, task, cache=None, show_progress_bar=False, encode_kwargs={"batch_size": 2})
        scores = result.task_results[0].scores["test"][0]
        # the same retrieval from our own API: gold document rank -> nDCG@10 and recall@1 (binary relevance)
        q = model.encode(TEXTS, prompt="Find the match: ")
        d = model.encode(images=list(corpus["image"])) if kind == "t2i" else model.encode(list(corpus["text"]))
    finally:
        model.prompts = {}
    s = q @ d.T
    ranks = [(s[i] > s[i, i]).sum().item() + 1 for i in range(len(TEXTS))]
    ndcg = np.mean([1 / math.log2(r + 1) if r <= 10 else 0.0 for r in ranks])
    assert abs(scores["ndcg_at_10"] - ndcg) < 1e-4, (scores["ndcg_at_10"], ndcg, ranks)
    assert abs(scores["recall_at_1"] - np.mean([r == 1 for r in ranks])) < 1e-4
    assert 0 < scores["ndcg_at_10"] < 1   # not a trivial score


def test_mteb_model_meta(model):
    pytest.importorskip("mteb", reason="mteb is not installed")
    meta = model.mteb_model_meta
    assert meta.embed_dim == model.dim and meta.similarity_fn_name == "cosine"
    assert set(meta.modalities) == {"text", "image"}
