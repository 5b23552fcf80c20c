"""Loaders: real on-disk layouts into stock transformers classes, no remote code, every tensor accounted for."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from diffembed import ConfigError, Embedder, EmbedderConfig
from diffembed.models.loading import load_backbone


def raw_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_dream_layout_loads_into_qwen2_without_remote_code(tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["dream"]
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "Dream" and "auto_map" in raw  # the layout really is Dream's
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "DreamTokenizer"

    def no_remote_code(*args, **kwargs):
        raise AssertionError("remote code was requested")

    monkeypatch.setattr(transformers.dynamic_module_utils, "get_class_from_dynamic_module", no_remote_code)
    backbone = load_backbone(EmbedderConfig(model=str(path)))
    assert type(backbone.model).__name__ == "Qwen2Model"
    assert backbone.report.missing == [] and backbone.report.unexpected == []
    assert backbone.report.skipped == ["lm_head.weight"]  # the LM head is the one tensor an embedder drops
    # Every other checkpoint tensor is in the model, value for value.
    state = backbone.model.state_dict()
    for name, tensor in raw_tensors(path).items():
        if name != "lm_head.weight":
            torch.testing.assert_close(state[name.removeprefix("model.")], tensor)
    assert backbone.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2: q/k/v biases
    assert backbone.model.layers[0].self_attn.o_proj.bias is None


def test_llada_layout_consumes_every_tensor(tiny_checkpoints):
    path = tiny_checkpoints["llada"]
    tensors = raw_tensors(path)
    assert any(k.startswith("model.transformer.blocks.0.attn_out") for k in tensors)  # OLMo names on disk
    backbone = load_backbone(EmbedderConfig(model=str(path)))
    assert type(backbone.model).__name__ == "LlamaModel"
    assert backbone.report.missing == [] and backbone.report.unexpected == []
    assert backbone.report.skipped == ["lm_head.weight"]  # model.transformer.ff_out, the LM head
    n_model = sum(p.numel() for p in backbone.model.parameters())
    n_disk = sum(t.numel() for k, t in tensors.items() if k != "model.transformer.ff_out.weight")
    assert n_model == n_disk


def reference_llada(tensors: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor, mask: torch.Tensor):
    """LLaDA's forward pass written out from the raw OLMo-named tensors (bidirectional, padding-masked)."""
    d, heads, eps = cfg["d_model"], cfg["n_heads"], cfg["rms_norm_eps"]
    hd = d // heads
    B, T = ids.shape

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(T).float(), inv)  # (T, hd/2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # (T, hd)

    def rope(x):  # (B, h, T, hd)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    bias = torch.zeros(B, 1, 1, T).masked_fill(mask[:, None, None, :] == 0, float("-inf"))  # keys only
    x = tensors["model.transformer.wte.weight"][ids]  # (B, T, d)
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, tensors[p + "attn_norm.weight"])
        q, k, v = (
            (h @ tensors[p + f"{n}_proj.weight"].T).view(B, T, heads, hd).transpose(1, 2) for n in "qkv"
        )  # (B, h, T, hd)
        att = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(hd) + bias  # (B, h, T, T)
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
        x = x + o @ tensors[p + "attn_out.weight"].T
        h = rms(x, tensors[p + "ff_norm.weight"])
        gate = torch.nn.functional.silu(h @ tensors[p + "ff_proj.weight"].T)
        x = x + (gate * (h @ tensors[p + "up_proj.weight"].T)) @ tensors[p + "ff_out.weight"].T
    return rms(x, tensors["model.transformer.ln_f.weight"])


def test_llada_output_equals_reference_forward(tiny_checkpoints):
    path = tiny_checkpoints["llada"]
    cfg = json.loads((path / "config.json").read_text())
    emb = Embedder(EmbedderConfig(model=str(path)))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 8], [11, 12, 13, 14, 0, 0, 0]])
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    with torch.inference_mode():
        ours = emb.model(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = reference_llada(raw_tensors(path), cfg, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral"])
def test_stock_ar_checkpoints_load_cleanly(model_path, family):
    backbone = load_backbone(EmbedderConfig(model=model_path(family)))
    assert backbone.family.name == family and backbone.attention == "causal"
    assert backbone.report.missing == [] and backbone.report.unexpected == []


def test_bf16_load(model_path):
    emb = Embedder(EmbedderConfig(model=model_path("dream"), dtype="bf16"))
    assert next(emb.model.parameters()).dtype == torch.bfloat16
    vec = emb.encode_documents(["bf16 still gives float32 vectors"])
    assert vec.dtype == "float32" and vec.shape == (1, emb.dimension)


def test_missing_path_is_one_line():
    with pytest.raises(ConfigError) as err:
        Embedder(EmbedderConfig(model="/nonexistent/checkpoint"))
    assert "/nonexistent/checkpoint" in str(err.value) and "\n" not in str(err.value)


def test_unknown_hub_id_offline_is_one_line():
    with pytest.raises(ConfigError) as err:
        Embedder(EmbedderConfig(model="no-such-org/no-such-model"))
    assert "no-such-org/no-such-model" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage, needle", [
    (lambda shard: shard.write_bytes(shard.read_bytes()[:2000]), "unreadable safetensors weights"),  # a cut copy
    (lambda shard: shard.unlink(), "names shard(s) ['model-00002-of-00003.safetensors']"),  # a shard not copied
], ids=["truncated", "missing"])
def test_damaged_checkpoint_is_one_line_before_any_actor_starts(tiny_checkpoints, tmp_path, capsys, damage, needle):
    """The embedder and, before they start encoder actors (which would fail with Ray tracebacks), the batch and
    mining jobs' drivers name the damaged file in one line."""
    import runpy
    import shutil

    root = Path(__file__).resolve().parents[1]
    model = shutil.copytree(tiny_checkpoints["qwen2"], tmp_path / "model")
    damage(model / "model-00002-of-00003.safetensors")
    with pytest.raises(ConfigError, match=re.escape(needle)) as err:
        Embedder(EmbedderConfig(model=str(model)))
    assert "\n" not in str(err.value)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "a", "text": "hello", "title": "t"}) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    for job, args in [("embed_corpus", ["--config", "jobs/configs/embed_cpu.yaml", f"input.paths=[{tmp_path}/docs.jsonl]",
                                        f"store.path={tmp_path}/q"]),
                      ("mine_negatives", ["--config", "jobs/configs/mine_exact.yaml",
                                          f"input.files=[{tmp_path}/pairs.jsonl]", f"output={tmp_path}/mined.jsonl"])]:
        main = runpy.run_path(str(root / "jobs" / f"{job}.py"))["main"]
        code = main([*args, f"embedder.model={model}"])
        err_lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err_lines) == 1 and needle in err_lines[0], (job, err_lines)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob("mined.jsonl*"))


def test_unknown_family_in_checkpoint_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        load_backbone(EmbedderConfig(model=str(tmp_path)))
    msg = str(err.value)
    assert "'mamba'" in msg and str(tmp_path) in msg and "\n" not in msg


def test_unknown_family_in_config_is_rejected():
    with pytest.raises(ConfigError) as err:
        EmbedderConfig.from_dict({"family": "gpt5"})
    assert "family" in str(err.value) and "\n" not in str(err.value)


def test_encoder_cannot_be_causal(model_path):
    with pytest.raises(ConfigError, match="bidirectional"):
        load_backbone(EmbedderConfig(model=model_path("bert"), attention="causal"))


def test_flash_attention_without_its_package_is_a_config_error():
    import importlib.util

    from diffembed.config import ConfigError

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package"):
        Embedder(EmbedderConfig(model="tiny:dream", attn_implementation="flash_attention_2"))


def test_cuda_requested_without_cuda_is_a_config_error():
    from diffembed.config import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Embedder(EmbedderConfig(model="tiny:dream", device="cuda"))


def test_dtype_auto_resolves_to_what_the_cpu_runs_natively():
    import torch

    from diffembed.models.loading import native_bf16, resolve_dtype

    cpu = torch.device("cpu")
    want = "bf16" if native_bf16(cpu) else "fp32"
    assert resolve_dtype("auto", cpu) == want
    assert resolve_dtype("fp32", cpu) == "fp32"  # an explicit dtype is never changed
    embedder = Embedder(EmbedderConfig(model="all-MiniLM-L6-v2", dtype="auto"))
    assert embedder.config.dtype == want
    assert next(embedder.model.parameters()).dtype == (torch.bfloat16 if want == "bf16" else torch.float32)


def test_a_drivers_model_checks_do_not_import_the_model_classes(tiny_checkpoints):
    """A job's driver (and Serve's build task) checks the model, reads its width and fingerprints it (config and
    tokenizer) without transformers' model classes, which cost a process ~3 s and ~130 MiB to import; the Embedder
    imports them when it loads the model."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from diffembed.batch.pipeline import model_dimension\n"
        "from diffembed.config import EmbedderConfig\n"
        "from diffembed.index.fingerprint import embedding_fingerprint\n"
        "from diffembed.models.loading import check_model\n"
        "for model in ('all-MiniLM-L6-v2', sys.argv[1]):\n"
        "    cfg = EmbedderConfig(model=model)\n"
        "    check_model(cfg)\n"
        "    embedding_fingerprint(cfg, model_dimension(cfg), 'cosine', False)\n"
        "print('transformers.modeling_utils' in sys.modules)\n"
        "from diffembed import Embedder\n"
        "Embedder(EmbedderConfig(model=sys.argv[1]))\n"
        "print('transformers.modeling_utils' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoints["dream"])], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"], result.stdout
