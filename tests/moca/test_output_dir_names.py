"""Issue 12 item 10: one name for the output folder on every command (--output-dir, config key output_dir),
the names used before (--out, --output, eval's output) accepted as aliases. ``moca demo --output`` used to be
rejected (only --out), eval had no output_dir and training no flag at all."""

import pytest

from moca.cli import build_parser


def parse(argv):
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("flag", ["--output-dir", "--output", "--out"])
def test_demo_and_data_take_every_name(flag):
    assert parse(["demo", flag, "somewhere"]).out == "somewhere"
    assert parse(["data", "embedded", flag, "corpus"]).out == "corpus"


@pytest.mark.parametrize("flag", ["--output-dir", "--output", "--out"])
@pytest.mark.parametrize("stage", ["cpt", "cl"])
def test_training_flag_sets_train_output_dir(flag, stage):
    from moca.config import load_config

    args = parse(["train", stage, "--set", "train.max_steps=3", flag, "runs/12"])
    if stage == "cpt":
        from moca.train.cpt import CptConfig as Config
    else:
        from moca.train.contrastive import ClConfig as Config
    cfg = load_config(Config, None, args.set)
    assert cfg.train.output_dir == "runs/12" and cfg.train.max_steps == 3


def test_eval_output_dir_and_its_alias(tmp_path):
    from pathlib import Path

    from moca.config import load_config
    from moca.eval import EvalConfig

    args = parse(["eval", "--output-dir", str(tmp_path / "ev")])
    cfg = load_config(EvalConfig, None, args.set)
    assert cfg.results_path == tmp_path / "ev" / "results.json"
    assert load_config(EvalConfig, None, ["output=r/x.json"]).results_path == Path("r/x.json")   # the old key
    assert load_config(EvalConfig, None, []).results_path == Path("runs/eval/results.json")      # the old default
    with pytest.raises(ValueError, match="not both"):
        load_config(EvalConfig, None, ["output=r/x.json", "output_dir=r"])
