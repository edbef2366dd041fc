"""The embedding API: shapes, normalisation, determinism, padded == packed, pooling, save/load, bad inputs."""

import random

import pytest
import torch

from moca.data.embedded import caption, draw_scene, random_scene
from moca.embedding import MocaEmbedder, pool_hidden

SIZES = dict(hidden=32, layers=2, heads=2, kv_heads=1, vision_hidden=16, vision_depth=2)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny ops: threads only add contention on a shared CPU
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    rng = random.Random(3)
    paths, caps = [], []
    for i in range(5):
        sc = random_scene(rng)
        p = root / f"s{i}.png"
        draw_scene(sc, 56 + 28 * (i % 3)).save(p)   # different sizes: different image grids
        paths.append(str(p))
        caps.append(caption(sc))
    return paths, caps


@pytest.fixture(scope="module")
def model():
    return MocaEmbedder.tiny(seed=1, image_size=84, **SIZES)


def _mixed(paths, caps):
    """Text, image, image+text and interleaved items in one call."""
    return [caps[0], [{"image": paths[1]}], [{"image": paths[2]}, caps[2]],
            ["look:", {"image": paths[3]}, "and", {"image": paths[4]}, "which is larger?"], caps[4][:9]]


def test_encode_shapes_dtype_and_unit_norm(model, scenes):
    paths, caps = scenes
    for kwargs, n in ((dict(texts=caps), 5), (dict(images=paths), 5), (dict(texts=caps, images=paths), 5),
                      (dict(texts=_mixed(paths, caps)), 5), (dict(texts=caps[0]), 1), (dict(images=paths[0]), 1)):
        e = model.encode(**kwargs, batch_size=2)
        assert e.shape == (n, model.dim) and e.dtype == torch.float32 and e.device.type == "cpu"
        torch.testing.assert_close(e.norm(dim=1), torch.ones(n), atol=1e-5, rtol=0)
        assert torch.isfinite(e).all()
    # different inputs give different vectors; the instruction changes the vector
    e = model.encode(texts=_mixed(paths, caps))
    assert (e @ e.T - torch.eye(5)).abs().max() < 0.9999
    plain, ins = model.encode(texts=caps[:1]), model.encode(texts=caps[:1], instruction="Find an image: ")
    assert (plain - ins).abs().max() > 1e-3


def test_encode_is_deterministic_and_independent_of_batching(model, scenes):
    paths, caps = scenes
    items = _mixed(paths, caps)
    a = model.encode(texts=items, batch_size=5)
    b = model.encode(texts=items, batch_size=5)
    assert torch.equal(a, b)
    one_by_one = model.encode(texts=items, batch_size=1)      # each sample alone in its row
    torch.testing.assert_close(one_by_one, a, atol=2e-6, rtol=0)
    again = MocaEmbedder.tiny(seed=1, image_size=84, **SIZES)  # same seed, same weights, same vectors
    torch.testing.assert_close(again.encode(texts=items), a, atol=2e-6, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "eos", "last"])
def test_padded_and_packed_encode_agree(model, scenes, pooling):
    paths, caps = scenes
    items = _mixed(paths, caps)
    model.pooling = pooling
    try:
        packed = model.encode(texts=items, batch_size=3, packed=True)
        padded = model.encode(texts=items, batch_size=3, packed=False)
    finally:
        model.pooling = "mean"
    torch.testing.assert_close(padded, packed, atol=2e-6, rtol=0)


def test_pooling_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    # row 0: samples 0 (2 tokens) and 1 (2 tokens); row 1: sample 2 (3 tokens) and padding
    idx = torch.tensor([0, 0, 1, 1, 2, 2, 2, -1])
    flat = hidden.reshape(8, 3).float()
    mean = pool_hidden(hidden, idx, 3, "mean", normalize=False)
    torch.testing.assert_close(mean, torch.stack([flat[0:2].mean(0), flat[2:4].mean(0), flat[4:7].mean(0)]))
    last = pool_hidden(hidden, idx, 3, "last", normalize=False)
    torch.testing.assert_close(last, flat[[1, 3, 6]])
    unit = pool_hidden(hidden, idx, 3, "mean")
    torch.testing.assert_close(unit, torch.nn.functional.normalize(mean, dim=-1))
    # gradients reach exactly the tokens of each sample, never the padding
    h = hidden.clone().requires_grad_(True)
    pool_hidden(h, idx, 3, "mean", normalize=False).sum().backward()
    assert h.grad.reshape(8, 3)[7].abs().sum() == 0 and (h.grad.reshape(8, 3)[:7] != 0).all()


def test_last_token_pooling_appends_no_eos_and_eos_pooling_does(model):
    eos = model.processor.ids["endoftext"]
    assert model.sample("a red circle", "x").input_ids[-1] != eos      # official inputs: no <|endoftext|>
    model.append_eos = True
    try:
        assert model.sample("a red circle", "x").input_ids[-1] == eos
    finally:
        model.append_eos = False
    model.pooling = "last"
    try:
        assert model.sample("a red circle", "x").input_ids[-1] != eos
    finally:
        model.pooling = "mean"


def test_pil_images_and_paths_give_the_same_embedding(model, scenes):
    from PIL import Image

    paths, _ = scenes
    with Image.open(paths[2]) as im:
        pil = im.convert("RGB")
    torch.testing.assert_close(model.encode(images=[pil]), model.encode(images=paths[2:3]), atol=1e-6, rtol=0)


def test_save_and_load_roundtrip(model, scenes, tmp_path):
    paths, caps = scenes
    model.pooling = "eos"
    try:
        before = model.encode(texts=caps, images=paths)
        model.save_pretrained(tmp_path / "m")
    finally:
        model.pooling = "mean"
    loaded = MocaEmbedder.from_pretrained(tmp_path / "m")
    assert loaded.pooling == "eos" and not loaded.backbone.causal
    torch.testing.assert_close(loaded.encode(texts=caps, images=paths), before, atol=1e-6, rtol=0)


def test_causal_flag_changes_the_embeddings(scenes):
    _, caps = scenes
    bi = MocaEmbedder.tiny(seed=1, **SIZES).encode(texts=caps)
    causal = MocaEmbedder.tiny(seed=1, causal=True, **SIZES).encode(texts=caps)
    assert (bi - causal).abs().max() > 1e-3


def test_bad_inputs_name_the_item(model, scenes, tmp_path):
    paths, caps = scenes
    with pytest.raises(ValueError, match=r"images\[1\].*does not exist"):
        model.encode(images=[paths[0], str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=r"texts\[2\].*empty text"):
        model.encode(texts=["a", "b", "  "])
    with pytest.raises(ValueError, match=r"texts\[1\].*does not exist"):
        model.encode(texts=["a", ["see", {"image": str(tmp_path / "nope.png")}]])
    with pytest.raises(ValueError, match=r"texts has 2 items but images has 3"):
        model.encode(texts=caps[:2], images=paths[:3])
    with pytest.raises(ValueError, match=r"texts\[0\].*empty"):
        model.encode(texts=[[]])
    with pytest.raises(ValueError, match="give texts=, images= or both"):
        model.encode()
    with pytest.raises(ValueError, match="3 instructions for 2 inputs"):
        model.encode(texts=caps[:2], instruction=["a", "b", "c"])
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"images\[0\].*cannot be read"):
        model.encode(images=[str(bad)])
    assert model.encode(texts=[]).shape == (0, model.dim)
    with pytest.raises(TypeError, match=r"instruction\[1\] must be a string or None, got int"):
        model.encode(texts=caps[:2], instruction=["a", 3])
    with pytest.raises(ValueError, match=r"images\[0\].*is a directory"):
        model.encode(images=[str(tmp_path)])
    with pytest.raises(ValueError, match=r"device='meta' but the model is on cpu.*model.to"):
        model.encode(texts=caps[:1], device="meta")


@pytest.mark.gpu
def test_encode_on_gpu_matches_cpu(scenes, monkeypatch):
    """Automatic backends on CUDA (Triton masked_attention): float32 close to the CPU torch path, padded ==
    packed, and bfloat16 weights within a cosine of 0.99 of float32."""
    monkeypatch.delenv("MOCA_KERNELS_IMPL", raising=False)
    paths, caps = scenes
    items = _mixed(paths, caps)
    ref = MocaEmbedder.tiny(seed=1, image_size=84, **SIZES).encode(texts=items)
    gpu = MocaEmbedder.tiny(seed=1, image_size=84, **SIZES).to("cuda")
    out = gpu.encode(texts=items, batch_size=3)
    assert out.device.type == "cpu" and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=5e-3, rtol=0)
    torch.testing.assert_close(gpu.encode(texts=items, packed=False, batch_size=3), out, atol=5e-3, rtol=0)
    bf16 = gpu.to(torch.bfloat16).encode(texts=items)
    assert bf16.dtype == torch.float32 and ((bf16 * ref).sum(1) > 0.99).all()
