"""moca: the MoCa model, its two training stages, the embedding API, evaluation and the ``moca`` command."""

__version__ = "0.1.0"
