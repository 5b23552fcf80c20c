"""Output quantization of served embeddings: int8 / uint8 scalar codes and binary / ubinary sign bits.

Scalar codes use one fixed calibration, the same for every request and every replica, derived from the vector
dimension alone (no calibration set, so a code computed today compares with one computed next month):

- a unit vector of dimension D whose direction is spread over all axes has coordinates of standard deviation
  sigma = 1/sqrt(D); every coordinate is clipped at +-CLIP_SIGMAS * sigma and mapped *symmetrically* onto the
  integers -127..127: `q = clip(rint(x / step), -127, 127)` with `step = CLIP_SIGMAS / (127 * sqrt(D))`.
  0 maps to 0 and every dimension shares one step, so `q_a . q_b = (a . b) / step**2` up to rounding: integer
  dot products rank exactly as the float ones do, apart from rounding noise.
- CLIP_SIGMAS = 6: the packaged MiniLM's largest coordinate on real text is ~4.5 sigma, so almost nothing is
  clipped even for anisotropic models, while the step (12 sigma over 254 levels, ~0.05 sigma) keeps the rounding
  noise at ~0.014 sigma per coordinate.
- uint8 is the same code shifted by +128 (1..255). Dequantize with `x ~= q * step` (int8) or
  `x ~= (q - 128) * step` (uint8).

The calibration assumes unit-normalised vectors (the ingress refuses int8/uint8 with `normalize: false`).

Binary codes follow sentence-transformers' `quantize_embeddings` conventions: bit i is `x_i > 0`, packed 8 per
byte with the first dimension in the most significant bit (`numpy.packbits`), the last byte zero-padded when D is
not a multiple of 8; `ubinary` is those bytes as uint8, `binary` the same bytes minus 128 as int8.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np

EncodingFormat = Literal["float", "base64", "int8", "uint8", "binary", "ubinary"]
ENCODING_FORMATS: tuple[str, ...] = ("float", "base64", "int8", "uint8", "binary", "ubinary")
SCALAR_FORMATS = ("int8", "uint8")  # the ones whose calibration assumes unit vectors

CLIP_SIGMAS = 6.0


def int8_step(dimension: int) -> float:
    """The float value of one int8 step for vectors of `dimension` (the same for every request)."""
    return CLIP_SIGMAS / (127.0 * float(np.sqrt(dimension)))


def to_int8(vectors: np.ndarray) -> np.ndarray:
    """(N, D) float -> (N, D) int8 in -127..127 (see the module docstring for the calibration)."""
    step = int8_step(vectors.shape[-1])
    return np.clip(np.rint(vectors / step), -127, 127).astype(np.int8)


def to_uint8(vectors: np.ndarray) -> np.ndarray:
    """(N, D) float -> (N, D) uint8 in 1..255: the int8 code + 128."""
    return (to_int8(vectors).astype(np.int16) + 128).astype(np.uint8)


def to_ubinary(vectors: np.ndarray) -> np.ndarray:
    """(N, D) float -> (N, ceil(D / 8)) uint8: sign bits, first dimension in the most significant bit."""
    return np.packbits(vectors > 0, axis=-1)


def to_binary(vectors: np.ndarray) -> np.ndarray:
    """(N, D) float -> (N, ceil(D / 8)) int8: the ubinary bytes - 128."""
    return (to_ubinary(vectors).astype(np.int16) - 128).astype(np.int8)


def encode(vectors: np.ndarray, encoding_format: EncodingFormat) -> list:
    """One JSON value per row of `vectors` (N, D) float32: a float32 row, a base64 string of little-endian
    float32 (OpenAI's `base64`), or an integer row for the quantized formats. Rows stay numpy arrays: the
    ingress writes them with orjson (`OPT_SERIALIZE_NUMPY`); `.tolist()` a row for other JSON writers."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if encoding_format == "float":
        return list(vectors)
    if encoding_format == "base64":
        return [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in vectors]
    codes = {"int8": to_int8, "uint8": to_uint8, "binary": to_binary, "ubinary": to_ubinary}[encoding_format]
    return list(codes(vectors))
