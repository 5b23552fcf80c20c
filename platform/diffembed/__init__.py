"""diffembed: fine-tune, batch-run and serve text embedders built on diffusion language models, on Ray."""

from diffembed.config import ConfigError, EmbedderConfig

__all__ = ["ConfigError", "Embedder", "EmbedderConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing the config (e.g. to validate a job's YAML) must not pay for torch/transformers.
    if name == "Embedder":
        from diffembed.models.embedder import Embedder

        return Embedder
    raise AttributeError(name)
