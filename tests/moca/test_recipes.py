"""The paper recipes in moca/configs/ load as configs (every key known, every value valid) once the folders they
point at exist, and say what the official recipe says."""

from pathlib import Path

import pytest
import yaml

import moca
from moca.config import from_dict

CONFIGS = Path(moca.__file__).parent / "configs"


def _materialise(d, root: Path):
    """Create every relative folder a recipe names (data/..., runs/.../final), so config-time checks pass."""
    if isinstance(d, dict):
        for k, v in d.items():
            if k in ("path", "image_root", "files") or (k == "model" and isinstance(v, str)):
                for p in (v if isinstance(v, list) else [v]):
                    if isinstance(p, str) and not p.endswith(".json"):
                        (root / p).mkdir(parents=True, exist_ok=True)
            _materialise(v, root)
    elif isinstance(d, list):
        for v in d:
            _materialise(v, root)


@pytest.mark.parametrize("name,cls_path", [
    ("cpt_moca_3b.yaml", "moca.train.cpt:CptConfig"), ("cpt_moca_7b.yaml", "moca.train.cpt:CptConfig"),
    ("cl_moca_3b.yaml", "moca.train.contrastive:ClConfig"), ("cl_moca_7b.yaml", "moca.train.contrastive:ClConfig"),
    ("eval_mmeb.yaml", "moca.eval:EvalConfig"), ("eval_vidore_v2.yaml", "moca.eval:EvalConfig")])
def test_recipe_loads(name, cls_path, tmp_path, monkeypatch):
    import importlib

    mod, cls = cls_path.split(":")
    d = yaml.safe_load((CONFIGS / name).read_text())
    monkeypatch.chdir(tmp_path)
    _materialise(d, tmp_path)
    cfg = from_dict(getattr(importlib.import_module(mod), cls), d)
    if name.startswith("cpt"):
        assert len(cfg.data.sources) == 10 and all(s.max_samples == 500000 for s in cfg.data.sources)
        assert cfg.train.lr == 2e-6 and cfg.masking.image_mask_mode == "bernoulli" and not cfg.loss.mae_head_norm
        assert cfg.data.max_length == 1280 and cfg.data.format == "moca_pretrain"
    elif name.startswith("cl"):
        assert len(cfg.data.subsets) == 30 and all(s.format == "pairs" for s in cfg.data.subsets)
        assert cfg.train.lr == 2e-5 and cfg.loss.temperature == 0.03 and cfg.data.hard_negatives == 2
        assert cfg.data.max_length == 1280 and cfg.model.pooling is None and not cfg.model.append_eos
    elif name == "eval_mmeb.yaml":
        assert len(cfg.tasks) == 36 and {t.split for t in cfg.tasks} == {"IND", "OOD"}
        assert cfg.min_pixels == 256 * 28 * 28 and cfg.max_pixels == 1024 * 28 * 28
    else:
        assert all(t.type == "beir" and t.doc_instruction_position == "after" for t in cfg.tasks)
