"""Tiny sentence-transformers models built from config (no downloads), shared by the integration tests."""

from __future__ import annotations

import os

import torch

WORDS = ("the a cat dog sat on mat ran in park sun rain car road red blue big small house tree bird flew over "
         "river boat green old new man woman child ate apple bread").split()


def tiny_bert_dir(root, seed: int = 0, dropout: float = 0.0, hidden: int = 16) -> str:
    """A 1-layer BERT (random init from ``seed``) with a word-level vocabulary, saved under ``root``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = os.path.join(str(root), f"tiny_bert_{seed}_{dropout}_{hidden}")
    if os.path.isdir(path):
        return path
    os.makedirs(path)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=os.path.join(path, "vocab.txt"))
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=32, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_sentence_transformer(path: str, dtype=torch.float32):
    """A SentenceTransformer (BERT + mean pooling) on the CPU from ``tiny_bert_dir``."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    tr = Transformer(path, max_seq_length=16)
    dim = tr.get_embedding_dimension() if hasattr(tr, "get_embedding_dimension") else tr.get_word_embedding_dimension()
    model = SentenceTransformer(modules=[tr, Pooling(dim, "mean")], device="cpu")
    return model.to(dtype)


def sentences(n: int, seed: int, length: int = 5) -> list:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(2, length + 1, (1,),
                                                                                    generator=g)),), generator=g))
            for _ in range(n)]
