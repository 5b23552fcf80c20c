"""Config models: YAML + key=value overrides through one validation, errors as one line."""

from __future__ import annotations

import pytest

from diffembed.config import ConfigError, EmbedderConfig


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "embedder.yaml"
    path.write_text("model: /ckpt/dream\nfamily: dream\nmax_length: 512\n")
    cfg = EmbedderConfig.from_yaml(path, ["max_length=1024", "dtype=bf16", "normalize=false", "dimensions=256"])
    assert (cfg.model, cfg.family, cfg.max_length, cfg.dtype, cfg.normalize, cfg.dimensions) == (
        "/ckpt/dream", "dream", 1024, "bf16", False, 256,
    )


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["colour=blue"], "colour"),  # unknown key
        (["pooling=max"], "pooling"),
        (["dtype=fp8"], "dtype"),
        (["max_length=2"], "max_length"),
        (["query_template=no placeholder"], "instruction"),
        (["max_length"], "key=value"),
    ],
)
def test_bad_values_are_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        EmbedderConfig.from_dict({}, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        EmbedderConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        EmbedderConfig.from_yaml(bad)
