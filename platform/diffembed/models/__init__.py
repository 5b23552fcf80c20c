"""Backbone registry and loaders, pooling, and the Embedder (one embedding path for train, batch, serve)."""

from diffembed.models.embedder import ChunkEmbeddings, Embedder, Segment
from diffembed.models.loading import Backbone, load_backbone

__all__ = ["Backbone", "ChunkEmbeddings", "Embedder", "Segment", "load_backbone"]
