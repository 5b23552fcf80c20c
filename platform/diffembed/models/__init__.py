"""Backbone registry and loaders, pooling, and the Embedder (one embedding path for train, batch, serve).

The names below load on first use: a job's driver imports `diffembed.models.loading` to check a model without
paying for transformers' model classes (the Embedder imports them).
"""

__all__ = ["Backbone", "ChunkEmbeddings", "Embedder", "Segment", "load_backbone"]


def __getattr__(name: str):
    if name in ("ChunkEmbeddings", "Embedder", "Segment"):
        from diffembed.models import embedder

        return getattr(embedder, name)
    if name in ("Backbone", "load_backbone"):
        from diffembed.models import loading

        return getattr(loading, name)
    raise AttributeError(name)
