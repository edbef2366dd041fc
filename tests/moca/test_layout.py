"""Issue 14 item 4: moca/'s layout. One model builder (moca.build) for both stages and eval with one dtype table;
the two stages' models side by side (moca.stage1, moca.stage2); commands imported plainly by cli.build_parser;
moca.eval a thin face over named modules; image loading through moca.data.images.load_image. The old import
paths keep working (the same objects)."""

import ast
import io
from pathlib import Path

import numpy as np
import pytest

import moca

ROOT = Path(moca.__file__).resolve().parent


def test_one_model_builder_and_old_paths():
    from moca import build
    from moca.train import contrastive, cpt

    assert cpt.ModelConfig is build.ModelConfig and cpt.build_model_and_processor is build.build_model_and_processor
    assert cpt.LOAD_DTYPES is build.LOAD_DTYPES and cpt.load_dtype is build.load_dtype
    assert issubclass(contrastive.ClModelConfig, build.ModelConfig)
    from moca.eval import EvalModelConfig, load_embedder

    assert EvalModelConfig is build.EvalModelConfig and load_embedder is build.load_embedder
    # one dtype table: no other module spells the dtype names out as a mapping
    for path in ROOT.rglob("*.py"):
        if path.name != "build.py":
            assert '"bfloat16": torch.bfloat16' not in path.read_text(), path


def test_one_dtype_error_for_training_and_eval():
    from moca.build import EvalModelConfig, ModelConfig, load_embedder

    with pytest.raises(ValueError, match="model.dtype must be float32, bfloat16 or float16, got 'bf16'"):
        ModelConfig(dtype="bf16")
    with pytest.raises(ValueError, match="model.dtype must be float32, bfloat16 or float16, got 'bf16'"):
        load_embedder(EvalModelConfig(dtype="bf16", device="cpu"))


def test_stage_models_side_by_side():
    from moca import stage1, stage2
    from moca.train import contrastive

    assert stage1.CptModel and stage1.LossConfig
    for name in ("ContrastiveModel", "LoraConfig", "apply_lora", "merge_lora", "build_contrastive_model",
                 "LORA_TARGETS"):
        assert getattr(contrastive, name) is getattr(stage2, name)
    tree = ast.parse((ROOT / "train" / "contrastive.py").read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert "ContrastiveModel" not in classes
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "cpt" for n in ast.walk(tree)), \
        "Stage 2 imports Stage 1's trainer module"


def test_cli_imports_its_commands_plainly():
    src = (ROOT / "cli.py").read_text()
    assert "importlib" not in src
    from moca.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "cl"]).func.__module__ == "moca.train.contrastive"
    assert parser.parse_args(["eval"]).func.__module__ == "moca.eval.runner"
    assert parser.parse_args(["demo"]).func.__module__ == "moca.demo"


def test_eval_package_face_is_thin():
    tree = ast.parse((ROOT / "eval" / "__init__.py").read_text())
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defs == []
    import moca.eval as ev
    from moca.eval import config, report, runner, tasks

    assert ev.EvalConfig is config.EvalConfig and ev.evaluate is tasks.evaluate
    assert ev.results_table is report.results_table and ev.run_eval is runner.run_eval
    for name in ev.__all__:
        assert hasattr(ev, name), name


def _png(w, h, seed=0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_one_image_loader(tmp_path):
    from moca.data.images import ImageError, ImageRoot, check_image_source, load_image
    from moca.data.processor import BadRecord, load_record_image
    from moca.data.published import EncodedImage
    from moca.data.retrieval import resolve_image

    data = _png(40, 30)
    (tmp_path / "a.png").write_bytes(data)
    direct = np.asarray(load_image(tmp_path / "a.png"))                      # a caller's path, as given
    rel = np.asarray(load_image("a.png", tmp_path))                          # a record's path under its folder
    enc = np.asarray(load_image(EncodedImage(data, "t.parquet:0")))          # bytes kept encoded
    assert direct.shape == (30, 40, 3) and (direct == rel).all() and (direct == enc).all()
    assert resolve_image("a.png", tmp_path) == (tmp_path / "a.png").resolve()
    check_image_source("a.png", tmp_path)
    check_image_source(EncodedImage(data, "t.parquet:0"))
    # the record loader is the same loader, its errors become BadRecord with the same reason
    with pytest.raises(ImageError) as e1:
        load_image("../x.png", tmp_path)
    with pytest.raises(BadRecord) as e2:
        load_record_image("../x.png", tmp_path, None, "r1")
    assert e1.value.reason == e2.value.reason == "outside_data_folder"
    small = ImageRoot(tmp_path, max_pixels=100)                              # the root's pixel bound applies
    with pytest.raises(ImageError, match="a.png"):
        load_image("a.png", small)
    with pytest.raises(ImageError):
        check_image_source("a.png", small)
