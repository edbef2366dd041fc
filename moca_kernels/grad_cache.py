"""GradCache: gradient caching for contrastive batches larger than memory (implemented in its own issue)."""


class GradCache:
    """Placeholder so the public name exists; the engine lands with the info_nce/GradCache issue."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("GradCache is not implemented yet (see the info_nce/GradCache issue)")
