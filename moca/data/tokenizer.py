"""Tokenizers: the tiny default (a byte-level BPE trained offline on the embedded text, shipped in the package)
or a checkpoint's own, both with Qwen's special tokens and MoCa's added ``<|mask|>``.

Rebuild the shipped file with ``python -m moca.data.tokenizer`` (deterministic for a given Python version's
bundled documentation; the shipped file is what the tests and the demo use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

TINY_TOKENIZER = Path(__file__).resolve().parent / "tokenizer" / "tokenizer.json"
MASK_TOKEN = "<|mask|>"
# Qwen2-VL's special tokens that moca relies on, by role.
QWEN_SPECIAL = {
    "endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "vision_pad": "<|vision_pad|>",
    "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>",
}
TINY_VOCAB = 2048
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def build_tiny_tokenizer(path: Path = TINY_TOKENIZER, vocab_size: int = TINY_VOCAB) -> Path:
    """Train the tiny byte-level BPE on :func:`moca.data.embedded.tokenizer_corpus` and write tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .embedded import tokenizer_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(QWEN_SPECIAL.values()) + [MASK_TOKEN]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def load_tokenizer(path: Optional[str] = None):
    """A transformers fast tokenizer: the shipped tiny one (``path=None``) or a checkpoint's, with ``<|mask|>``.

    Raises FileNotFoundError when ``path`` is not a local directory holding tokenizer files (it is never
    looked up on the hub), ValueError when the tokenizer lacks one of Qwen's vision tokens.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path is None:
        if not TINY_TOKENIZER.exists():
            raise FileNotFoundError(f"{TINY_TOKENIZER} is missing; rebuild it with python -m moca.data.tokenizer")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(TINY_TOKENIZER), eos_token=QWEN_SPECIAL["endoftext"],
                                      pad_token=QWEN_SPECIAL["endoftext"],
                                      additional_special_tokens=[t for k, t in QWEN_SPECIAL.items() if k != "endoftext"])
    else:
        folder = Path(path)
        if not folder.is_dir():   # transformers would take a missing folder for a hub id and try the network
            raise FileNotFoundError(f"{folder}: no such directory (expected a local checkpoint directory with the "
                                    "tokenizer files; moca never downloads)")
        if not any((folder / f).exists() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"{folder}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    add_mask_token(tok)
    special_ids(tok)  # validates
    return tok


def add_mask_token(tokenizer) -> int:
    """Add ``<|mask|>`` as a special added token (never split, skipped when decoding) if missing; returns its id.

    The id is the tokenizer's next free id, which can be past the model's embedding rows: the Stage 1 trainer
    then resizes the embeddings (:func:`moca.build.build_model_and_processor`).
    """
    if MASK_TOKEN not in tokenizer.get_vocab():
        from tokenizers import AddedToken

        # add_tokens(special_tokens=True) is the same call in every transformers release (add_special_tokens'
        # keyword for "extend, do not replace" was renamed in 5.x)
        tokenizer.add_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(MASK_TOKEN)


def special_ids(tokenizer) -> Dict[str, int]:
    """Ids of Qwen's special tokens (by role, see ``QWEN_SPECIAL``) and of ``mask``."""
    vocab = tokenizer.get_vocab()
    out = {}
    for role, tok in list(QWEN_SPECIAL.items()) + [("mask", MASK_TOKEN)]:
        if tok not in vocab:
            if role in ("im_start", "im_end", "vision_pad"):
                continue
            raise ValueError(f"tokenizer has no {tok} token (needed as {role}); is this a Qwen2-VL tokenizer?")
        out[role] = vocab[tok]
    return out


def never_masked_ids(tokenizer) -> list:
    """Token ids the text masking must never replace: every special / added token (vision tokens included)."""
    ids = set(tokenizer.all_special_ids)
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", True):
            ids.add(int(tid))
    ids.update(special_ids(tokenizer).values())
    return sorted(ids)


if __name__ == "__main__":
    p = build_tiny_tokenizer()
    print(f"wrote {p} ({p.stat().st_size / 1e3:.0f} kB)")
