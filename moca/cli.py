"""The ``moca`` command.

    moca demo [--quick] [--model PATH] [--device cuda]                  the whole pipeline on embedded data
    moca train cpt --config run.yaml [--set train.max_steps=10 ...]    Stage 1 (continual pre-training)
    moca train cl --config run.yaml [--set loss.temperature=0.03 ...]  Stage 2 (contrastive fine-tuning)
    moca eval --config eval.yaml [--model PATH]                         evaluation: a table and JSON
    moca data embedded --output-dir DIR [--docs N]                      write the embedded Stage 1 corpus

Every command names its output folder ``--output-dir`` (config key ``output_dir``); ``--output`` and ``--out``
are accepted as aliases.

``train cl``, ``eval`` and ``demo`` live in their modules (:mod:`moca.train.contrastive`,
:mod:`moca.eval.runner`, :mod:`moca.demo`), imported by :func:`build_parser`; each registers its parser with an
``add_cli(subparsers, train_subparsers)`` function that sets ``func`` on it. A bad config, override, file or
argument ends with ``moca: error: ...`` and exit status 2; a disk
error (read-only or full folder, damaged checkpoint) or an output folder in use by another run with exit status 1;
a training run stopped by SIGTERM / SIGINT (after writing a checkpoint) with one line and 128 + the signal number.
Multi-GPU: ``torchrun --nproc_per_node N -m moca.cli train cpt|cl --config ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def _train_cpt(args) -> int:
    from .config import load_config
    from .train.cpt import CptConfig, run_cpt

    import os

    from pathlib import Path

    config = args.config or Path(__file__).resolve().parent / "configs" / "cpt_tiny.yaml"
    cfg = load_config(CptConfig, config, args.set)
    history = run_cpt(cfg)
    if history and os.environ.get("RANK", "0") == "0":
        last = history[-1]
        where = (f"model in {cfg.train.output_dir}/final" if last["step"] >= cfg.train.max_steps
                 else f"stopped at step {last['step']} of {cfg.train.max_steps}; run again to resume")
        print(f"stage 1: step {last['step']}, loss {last.get('loss', float('nan')):.4f} "
              f"(mlm {last.get('mlm_loss', float('nan')):.4f}, mae {last.get('mae_loss', float('nan')):.4f}); {where}")
    return 0


def _data_embedded(args) -> int:
    from .data.embedded import write_cpt_corpus

    path = write_cpt_corpus(args.out, n_docs=args.docs, seed=args.seed)
    print(f"wrote {path}")
    return 0


# One name for "where the outputs go" on every command: --output-dir (config key output_dir); the names some
# commands used before are accepted as aliases.
OUTPUT_DIR_FLAGS = ("--output-dir", "--output", "--out")


class _SetOutputDir(argparse.Action):
    """``--output-dir DIR`` on a config-driven command: the same as ``--set <key>=DIR`` (a string, quoted)."""

    def __init__(self, option_strings, dest, key: str, **kwargs):
        self.key = key
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        import json

        namespace.set = list(getattr(namespace, "set", None) or []) + [f"{self.key}={json.dumps(values)}"]


def add_output_dir_override(parser, key: str) -> None:
    """``--output-dir`` (aliases ``--output``, ``--out``) setting config key ``key`` (after the --set list)."""
    parser.add_argument(*OUTPUT_DIR_FLAGS, dest="_output_dir", action=_SetOutputDir, key=key, metavar="DIR",
                        default=argparse.SUPPRESS, help=f"output folder (sets {key}; --output / --out: aliases)")


def add_train_cpt(train_sub) -> None:
    p = train_sub.add_parser("cpt", help="Stage 1: modality-aware continual pre-training (MLM + MAE)")
    p.add_argument("--config", default=None, help="YAML config (default: moca/configs/cpt_tiny.yaml, the tiny model on the embedded corpus)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=20 (repeatable)")
    add_output_dir_override(p, "train.output_dir")
    p.set_defaults(func=_train_cpt)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moca", description="MoCa: bidirectional multimodal embedding models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="training stages")
    train_sub = train.add_subparsers(dest="stage", required=True)
    add_train_cpt(train_sub)
    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="what", required=True)
    emb = data_sub.add_parser("embedded", help="write the embedded Stage 1 corpus (JSONL + PNG)")
    emb.add_argument(*OUTPUT_DIR_FLAGS, dest="out", required=True, metavar="DIR",
                     help="output folder (cpt.jsonl and images/; --output / --out: aliases)")
    emb.add_argument("--docs", type=int, default=400, help="number of documents (default 400)")
    emb.add_argument("--seed", type=int, default=0, help="seed (the same seed writes the same files)")
    emb.set_defaults(func=_data_embedded)
    from .data.inspect import add_inspect

    add_inspect(data_sub)
    # the other commands live in their modules, each registering its parser through add_cli(sub, train_sub)
    from .demo import add_cli as add_demo
    from .eval.runner import add_cli as add_eval
    from .train.contrastive import add_cli as add_train_cl

    add_train_cl(sub, train_sub)
    add_eval(sub, train_sub)
    add_demo(sub, train_sub)
    return parser


def _load_extensions() -> None:
    """Kept for older callers: every command is now registered by :func:`build_parser` (nothing to load)."""


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import yaml

        yaml_error = yaml.YAMLError
    except ImportError:   # pragma: no cover - pyyaml comes with the model extra
        yaml_error = ValueError
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"moca: error: {exc}", file=sys.stderr)
        return 2
    except yaml_error as exc:   # a config file or a --set value that is not valid YAML
        print(f"moca: error: invalid YAML: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:      # a read-only or full disk, a damaged checkpoint: the message names the path
        print(f"moca: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # Ctrl-C outside a training loop (which stops gracefully instead)
        print("moca: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code = getattr(exc, "moca_exit_code", None)   # a run stopped by a signal (128 + signal), a locked folder
        if code is None:
            raise
        print(f"moca: {'error: ' if code == 1 else ''}{exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
