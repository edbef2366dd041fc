"""docs/architecture.md, checked by following it: its toy op (the ```python toy-op block) is written to a module,
imported, and tested end to end as the doc says a new op must be: against float64, with gradients, through
automatic and forced dispatch (variants included, a refusing variant raising its reasons), poisoned outputs,
torch.compile in one graph, and torch.library.opcheck. The doc's file references must exist in the repository
and it must point at nothing outside it."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from moca_kernels import _alloc, tuning
from moca_kernels.dispatch import BackendUnavailable
from tests.helpers import rand

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    text = DOC.read_text()
    blocks = re.findall(r"```python toy-op\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/architecture.md must hold one ```python toy-op block"
    path = tmp_path_factory.mktemp("toy") / "moca_toy_op.py"   # triton.jit reads its kernel's source file
    path.write_text(blocks[0])
    spec = importlib.util.spec_from_file_location("moca_toy_op", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["moca_toy_op"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("moca_toy_op", None)


@pytest.mark.parametrize("impl", [None, "triton", "triton:rows", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_toy_op_matches_float64_with_gradients(toy, impl, dtype, device):
    x = rand(5, 37, dtype=dtype, device=device).requires_grad_()
    g = rand(5, 37, dtype=dtype, device=device)
    with _alloc.poisoned():
        y = toy.toy_scale(x, -1.5, impl=impl)
        y.backward(g)
    assert y.dtype == dtype and y.shape == x.shape
    x64 = x.detach().double().requires_grad_()
    ref = toy.toy_scale_reference(x64, -1.5)
    ref.backward(g.double())
    tol = dict(rtol=torch.finfo(dtype).eps, atol=0)   # one rounding of the product in x's dtype
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)


def test_toy_op_dispatch_follows_the_doc(toy, device, monkeypatch):
    assert toy._OP.spellings() == ["triton", "triton:rows", "torch"]
    x = rand(3, 8, device=device)
    assert toy._OP.select(None, x=x, alpha=2.0).spelling == "triton"    # the default variant only
    assert toy._OP.select(None, x=x.double(), alpha=2.0).spelling == "torch"
    wide = rand(2, 5000, device=device)
    with pytest.raises(BackendUnavailable, match="backend 'triton:rows' cannot take these inputs: rows of 5000"):
        toy.toy_scale(wide, 2.0, impl="triton:rows")
    torch.testing.assert_close(toy.toy_scale(wide, 2.0), wide * 2.0)   # automatic: the flat default takes it
    monkeypatch.setenv("MOCA_KERNELS_IMPL", "toy_scale=triton:rows")
    with pytest.raises(BackendUnavailable, match="rows of 5000"):
        toy.toy_scale(wide, 2.0)
    with pytest.raises(ValueError, match="toy_scale: unknown kernel variant 'cols'"):
        toy.toy_scale(x, 2.0, impl="triton:cols")
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        toy.toy_scale(x, float("nan"))


def test_toy_op_tunes_through_tuning_pick(toy, device):
    tuning.clear()
    toy.toy_scale(rand(3, 8, device=device), 2.0, impl="triton")
    assert list(tuning.cached("toy_scale")) == [("toy_scale", "flat", torch.float32, torch.device(device))]


def test_toy_op_compiles_in_one_graph_and_passes_opcheck(toy, device):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda x: toy.toy_scale(x, 3.0, impl="triton").sum(), backend=counter, fullgraph=True)
    x = rand(4, 16, device=device).requires_grad_()
    fn(x).backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))
    torch.library.opcheck(torch.ops.moca_toy.scale.default, (rand(4, 16, device=device).requires_grad_(), 3.0, "flat"))


def test_doc_points_only_at_files_in_the_repository():
    text = DOC.read_text()
    for ref in sorted(set(re.findall(r"`((?:moca_kernels|moca|bench|tests|csrc|docs)/[\w./]+)`", text))):
        assert (ROOT / ref).exists(), f"docs/architecture.md names {ref}, which is not in the repository"
    for short in ("attention/op.py", "attention/launch.py", "attention/metadata.py", "losses/masked_patch_loss_cuda.py",
                  "losses/masked_token_loss_triton.py", "losses/info_nce_triton.py"):
        assert short in text and (ROOT / "moca_kernels" / short).exists(), short
    assert not re.search(r"DESIGN\.md|STYLE\.md|/work/|https?://", text), "the doc points outside the repository"
