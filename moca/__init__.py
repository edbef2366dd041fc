"""moca: the MoCa model, its two training stages, the embedding API, evaluation and the ``moca`` command."""

__version__ = "0.1.0"

try:  # register the "moca" transformers attention implementation (attention + mask hook) on import
    import transformers as _transformers  # noqa: F401
except ImportError:  # the kernel-only install (no transformers): nothing to register
    pass
else:
    from moca_kernels.integrations import transformers as _moca_transformers  # noqa: F401
