"""Export peak host memory at 7B width: a Dream-layout bf16 checkpoint 3584 wide (28 heads, 4 KV heads, MLP
18944: Dream-7B's layer shapes) with a few layers, a LoRA adapter checkpoint on every projection, and the export
of the two (load in bf16, fp32 merge per weight, sharded safetensors) run in a child process.

Prints the model's bytes, the child's peak RSS (VmHWM), its RSS once the libraries are imported (the
interpreter + torch + transformers baseline, ~0.5 GB, which does not grow with the model) and two ratios: peak /
model bytes, and (peak - baseline) / model bytes, the part that scales with the model; the target for both at
7B is <= 1.3 (the old export, fp32 load + full fp32 state dict, needed ~6x). The baseline run named here is the
interpreter itself, measured in the same child.

    python bench/export_memory.py [--layers 4] [--hidden 3584] [--intermediate 18944] [--r 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rss_peak_bytes() -> int:
    """This process's peak RSS: VmHWM, which exec resets (ru_maxrss would carry the parent's peak over a fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: kB on Linux, bytes on macOS


def write_base(directory: Path, args) -> int:
    """A random checkpoint in Dream's layout, recast to bf16 (as Dream-7B ships) in ~4 shards; returns its bytes."""
    import torch
    from safetensors.torch import load_file, save_file

    from diffembed.testing.tiny import write_tiny_checkpoint

    write_tiny_checkpoint("dream", directory, hidden_size=args.hidden, layers=args.layers, heads=args.heads,
                          kv_heads=args.kv_heads, intermediate_size=args.intermediate)
    files = sorted(directory.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update({k: v.to(torch.bfloat16) for k, v in load_file(f).items()})
        f.unlink()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards, current, size, weight_map = [], {}, 0, {}
    for name, t in tensors.items():
        current[name] = t
        size += t.numel() * t.element_size()
        if size >= total / 4:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = json.loads((directory / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return total


def write_lora_checkpoint(base: Path, ckpt: Path, r: int) -> None:
    """The torch backend's checkpoint layout (`torch/model.pt`) with a random adapter on every projection, named
    as peft names the trained module's parameters; shapes are read from the base's safetensors headers."""
    import torch
    from safetensors import safe_open

    from diffembed.train.checkpoints import TORCH_DIR, TORCH_MODEL_FILE

    state = {}
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                module = name.removeprefix("model.").removesuffix(".weight")
                if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LORA_TARGETS:
                    out_features, in_features = fh.get_slice(name).get_shape()
                    prefix = f"base_model.model.{module}"
                    state[f"{prefix}.lora_A.default.weight"] = torch.randn(r, in_features) * 0.01
                    state[f"{prefix}.lora_B.default.weight"] = torch.randn(out_features, r) * 0.01
    (ckpt / TORCH_DIR).mkdir(parents=True)
    torch.save(state, ckpt / TORCH_DIR / TORCH_MODEL_FILE)


def child(config_json: str, ckpt: str) -> None:
    """The measured process: libraries imported (baseline), then one export."""
    import ray.train  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Qwen2Model  # noqa: F401

    from diffembed.train.config import TrainConfig
    from diffembed.train.export import export_from_checkpoint

    baseline = rss_peak_bytes()
    cfg = TrainConfig.model_validate_json(config_json)
    export_from_checkpoint(cfg, ray.train.Checkpoint.from_directory(ckpt))
    print(json.dumps({"baseline": baseline, "peak": rss_peak_bytes()}))


def measure(args) -> dict:
    from diffembed.train.config import TrainConfig

    with tempfile.TemporaryDirectory(prefix="export-memory-", dir=args.tmp) as tmp:
        base, ckpt = Path(tmp, "base"), Path(tmp, "ckpt")
        model_bytes = write_base(base, args)
        write_lora_checkpoint(base, ckpt, args.r)
        cfg = TrainConfig.from_dict({
            "embedder": {"model": str(base)}, "data": {"train_files": ["unused.jsonl"]},
            "lora": {"r": args.r, "alpha": 2 * args.r},
            "run": {"storage_path": str(Path(tmp, "runs")), "export_dir": str(Path(tmp, "export"))},
        })
        proc = subprocess.run([sys.executable, __file__, "--child", cfg.model_dump_json(), str(ckpt)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        child_rss = json.loads(proc.stdout.strip().splitlines()[-1])
        exported = sum(f.stat().st_size for f in Path(tmp, "export").glob("*.safetensors"))
    peak, baseline = child_rss["peak"], child_rss["baseline"]
    return {"model_bytes": model_bytes, "export_bytes": exported, "peak_rss": peak, "baseline_rss": baseline,
            "ratio_peak": peak / model_bytes, "ratio_net": (peak - baseline) / model_bytes}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=18944)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--tmp", default=None, help="where to write the checkpoints (default: the system temp dir)")
    args = parser.parse_args()
    result = measure(args)
    gib = 2**30
    print(f"model {result['model_bytes'] / gib:.2f} GiB bf16 ({args.layers} layers x {args.hidden} wide), "
          f"export {result['export_bytes'] / gib:.2f} GiB")
    print(f"child peak RSS {result['peak_rss'] / gib:.2f} GiB, after imports {result['baseline_rss'] / gib:.2f} GiB")
    print(f"peak / model = {result['ratio_peak']:.2f}   (peak - imports) / model = {result['ratio_net']:.2f}"
          "   (target <= 1.3)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
