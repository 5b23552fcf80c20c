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


# ---------------------------------------------------------------- overrides parsed by the field's type

TRAIN_BASE = {"data": {"train_files": ["pairs.jsonl"]}}


def train_config(*overrides: str):
    from diffembed.train.config import TrainConfig

    return TrainConfig.from_dict(TRAIN_BASE, list(overrides))


def test_text_fields_keep_the_raw_string():
    cfg = train_config("run.name=no", "embedder.query_instruction=yes: no", "embedder.model=1e3",
                       "embedder.device=null")
    assert cfg.run.name == "no"  # YAML would have made it False
    assert cfg.embedder.query_instruction == "yes: no"  # ... and this a mapping
    assert cfg.embedder.model == "1e3"
    assert cfg.embedder.device is None  # optional text: null is None
    cfg = EmbedderConfig.from_dict({}, ["query_instruction=Given a claim: find the evidence: [a] {b} #c",
                                        "query_template=Instruct: {instruction}\\nQuery: "])
    assert cfg.query_instruction == "Given a claim: find the evidence: [a] {b} #c"
    assert cfg.query_template == "Instruct: {instruction}\\nQuery: "  # no escape processing


@pytest.mark.parametrize(
    "override, expected",
    [
        ('query_instruction="Given a claim: find it"', "Given a claim: find it"),  # one pair of quotes stripped
        ("query_instruction='yes'", "yes"),
        ("query_instruction=\"'both'\"", "'both'"),  # only one pair
        ('query_instruction="unbalanced', '"unbalanced'),
        ('query_instruction="null"', "null"),  # quoted: the word, not None
        ("query_instruction=", None),  # optional text: empty is None ...
        ("query_instruction=~", None),
        ("attn_implementation='eager'", "eager"),  # a Literal of strings is text too
    ],
)
def test_quotes_and_nulls_on_text_fields(override, expected):
    cfg = EmbedderConfig.from_dict({}, [override])
    assert getattr(cfg, override.partition("=")[0]) == expected


def test_empty_value_of_a_plain_str_field_is_the_empty_string():
    cfg = train_config("run.name=ok", "embedder.query_template=Q {instruction} ")
    assert train_config("run.name=").run.name == ""  # `str` (not optional): "" rather than None
    assert cfg.embedder.query_template == "Q {instruction} "  # trailing space kept


def test_other_fields_still_parse_as_yaml():
    cfg = EmbedderConfig.from_dict({}, ["max_length=512", "normalize=false", "max_length=1024", "dimensions=null"])
    assert cfg.max_length == 1024 and isinstance(cfg.max_length, int)
    assert cfg.normalize is False and cfg.dimensions is None
    cfg = train_config(
        "lora.target_modules=[q, k]", "data.train_files=[a.jsonl, 'b c.jsonl']", "deepspeed.zero_stage=3",
        "optim.lr=1e-4", "deepspeed.bf16=true", "run.resources_per_worker={pool: 1}",
        "run.resources_per_worker.other=2", "loss.grad_cache_chunk_size=4",
    )
    assert cfg.lora.target_modules == ["q", "k"]
    assert cfg.data.train_files == ["a.jsonl", "b c.jsonl"]
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.bf16 is True  # Literal of ints, bool | None
    assert cfg.optim.lr == 1e-4 and cfg.loss.grad_cache_chunk_size == 4
    assert cfg.run.resources_per_worker == {"pool": 1.0, "other": 2.0}  # dotted key into a dict field


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["run.nmae=x"], "nmae"),  # unknown keys are still reported by validation
        (["embedder.colour=blue"], "colour"),
        (["run.num_workers=two"], "num_workers"),
        (["run.name.first=x"], "name"),  # a text field is not a section
        (["lora.r=[unclosed"], "YAML"),  # a malformed YAML value: one-line ConfigError, not a crash
    ],
)
def test_bad_train_overrides_are_one_line(overrides, needle):
    with pytest.raises(ConfigError) as err:
        train_config(*overrides)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_yaml_file_and_text_overrides(tmp_path):
    from diffembed.train.config import TrainConfig

    path = tmp_path / "train.yaml"
    path.write_text("data: {train_files: [x.jsonl]}\nrun: {name: base}\nembedder: {max_length: 64}\n")
    cfg = TrainConfig.from_yaml(path, ["run.name=off", "embedder.max_length=128", "embedder.query_instruction=on"])
    assert (cfg.run.name, cfg.embedder.max_length, cfg.embedder.query_instruction) == ("off", 128, "on")


def test_deepspeed_offload_needs_deepspeed():
    with pytest.raises(ConfigError, match="deepspeed.enabled"):
        train_config("deepspeed.enabled=false", "deepspeed.offload_optimizer=true")
    assert train_config("deepspeed.enabled=false").deepspeed.enabled is False
