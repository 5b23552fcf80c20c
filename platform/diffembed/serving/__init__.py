"""Online serving on Ray Serve: an encoder deployment, a retriever over Qdrant, and an HTTP ingress."""

from diffembed.serving.config import AutoscalingArgs, EncoderArgs, LimitsArgs, ServeArgs

__all__ = ["AutoscalingArgs", "EncoderArgs", "LimitsArgs", "ServeArgs"]
