"""One-GPU training step throughput: naive padded batches vs length-planned micro-batches (same process).

Runs the library directly — `Embedder`, `build_trainable` (peft LoRA + gradient checkpointing), `info_nce`,
`diffembed.train.microbatch` — with no Ray and no DeepSpeed, on CUDA when present. The backbone is a random
Dream-layout checkpoint at the real Dream-7B width (hidden 3584, 28 heads, 4 KV heads, intermediate 18944)
with `--layers` layers (default 4), in bf16; LoRA r=16 on q,k,v,o,gate,up,down. Each step: 16 queries of 64
tokens, 16 positives and 16 hard negatives with lognormal lengths (median 450, sigma 0.5, cap 2048), synthetic
token ids; InfoNCE; AdamW on the adapter.

Modes (same rows, same model, timed after warm-up):
  naive    every group in one batch padded to its longest row (train_step without GradCache);
  planned  every group cut by `plan_chunks` into length-sorted sub-batches, embedded with `embed_in_order`
           (padded only to each sub-batch's longest row), one backward.

It also prints what the training job's agreement between ranks costs on this length mix (`--ranks` simulated
ranks, no model): every rank runs as many sub-batches per group as the rank that planned most
(`microbatch.plan_groups`, which ZeRO-2/3's collectives need); sub-batches per step and padding, alone vs agreed.

Model FLOPs per step (what MFU counts; the recompute of gradient checkpointing is NOT counted, padding neither):
  4 * N_base * T      frozen base weights: 2 N T forward + 2 N T backward for activation gradients only
+ 6 * N_lora * T      adapter weights: forward, activation and weight gradients
+ 12 * L * d * sum(s_i^2)   bidirectional attention: QK^T and AV (4 s^2 d per layer forward), twice that backward
with N_base the backbone's non-embedding parameters, T the real (unpadded) tokens of the step, s_i each row's
real length, d the hidden size, L the layers. MFU = model FLOPs / step time / (--peak-tflops * 1e12).

    python bench/gpu_train.py [--layers 4] [--steps 5] [--warmup 2] [--peak-tflops 989]
    python bench/gpu_train.py --tiny      # CPU smoke run with a tiny model (< 60 s)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

from diffembed.config import EmbedderConfig
from diffembed.models.embedder import Embedder, Segment
from diffembed.testing.tiny import write_tiny_checkpoint
from diffembed.train.config import TrainConfig
from diffembed.train.losses import info_nce
from diffembed.train.microbatch import OVERHEAD_TOKENS, embed_in_order, padding_fraction, plan_chunks, split_to
from diffembed.train.backends import use_training_attention
from diffembed.train.worker import build_trainable

DREAM_7B = dict(hidden_size=3584, heads=28, kv_heads=4, intermediate_size=18944)
TINY = dict(hidden_size=64, heads=4, kv_heads=2, intermediate_size=128)


def make_segments(lengths: list[int], vocab: int, rng: np.random.Generator) -> list[Segment]:
    return [Segment([int(x) for x in rng.integers(10, vocab, n)], [1] * n, row, (0, n), (0, n))
            for row, n in enumerate(lengths)]


def step_groups(args, vocab: int, seed: int) -> list[list[Segment]]:
    rng = np.random.default_rng(seed)
    docs = lambda: np.clip(rng.lognormal(np.log(args.median), 0.5, args.batch), 8, args.cap).astype(int).tolist()
    return [make_segments([args.query_len] * args.batch, vocab, rng),
            make_segments(docs(), vocab, rng), make_segments(docs(), vocab, rng)]


def model_flops(model, groups, layers: int, hidden: int) -> float:
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "embed_tokens" not in n)
    lengths = [len(s.ids) for g in groups for s in g]
    tokens = sum(lengths)
    return 4 * base * tokens + 6 * lora * tokens + 12 * layers * hidden * sum(s * s for s in lengths)


def rank_agreement(args, steps: int = 50) -> str:
    """What the training job's agreement costs (`plan_groups`: every rank runs as many sub-batches per group as
    the rank that planned most, which ZeRO-2/3's collectives need): sub-batches per step and padding, each rank
    planning alone vs agreed, over `args.ranks` simulated ranks of this bench's length mix (no model)."""
    rng = np.random.default_rng(1)
    alone = agreed = pad_alone = pad_agreed = 0.0
    for _ in range(steps):
        ranks = [[[args.query_len] * args.batch] + [np.clip(rng.lognormal(np.log(args.median), 0.5, args.batch), 8,
                                                            args.cap).astype(int).tolist() for _ in range(2)]
                 for _ in range(args.ranks)]
        own = [[plan_chunks(g, overhead_tokens=args.overhead_tokens) for g in r] for r in ranks]
        most = [max(len(o[g]) for o in own) for g in range(3)]  # what `max_over_ranks` returns to every rank
        for r, o in zip(ranks, own):
            plans = [split_to(g, p, k) for g, p, k in zip(r, o, most)]  # plan_groups' cut, on the plans made above
            alone += sum(len(p) for p in o)
            agreed += sum(len(p) for p in plans)
            pad_alone += np.mean([padding_fraction(g, p) for g, p in zip(r[1:], o[1:])])
            pad_agreed += np.mean([padding_fraction(g, p) for g, p in zip(r[1:], plans[1:])])
    n = steps * args.ranks
    return (f"{args.ranks} ranks agreeing on sub-batch counts: {alone / n:.1f} -> {agreed / n:.1f} sub-batches per "
            f"step ({agreed / alone:.2f}x), document padding {pad_alone / n:.1%} -> {pad_agreed / n:.1%}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode: str, embedder: Embedder, optimizer, batches, args, device) -> dict[str, float]:
    def embed(segs):
        return embedder.forward(embedder.collate(segs))  # (b, D)

    def step(groups) -> None:
        if mode == "naive":
            q, p, n = (embed(g) for g in groups)
        else:
            q, p, n = (embed_in_order(embed, g, plan_chunks([len(s.ids) for s in g], max_tokens=args.max_tokens,
                                                                 overhead_tokens=args.overhead_tokens))
                       for g in groups)
        info_nce(q, p, n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for groups in batches[: args.warmup]:
        step(groups)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for groups in batches[args.warmup :]:
        step(groups)
    sync(device)
    elapsed = time.perf_counter() - start
    timed = batches[args.warmup :]
    real = padded = 0
    for groups in timed:
        for g in groups:
            lengths = [len(s.ids) for s in g]
            plan = [list(range(len(g)))] if mode == "naive" else plan_chunks(
                lengths, max_tokens=args.max_tokens, overhead_tokens=args.overhead_tokens)
            real += sum(lengths)
            padded += sum(max(lengths[i] for i in c) * len(c) for c in plan)
    flops = sum(model_flops(embedder.model, groups, args.layers_built, args.hidden) for groups in timed)
    return {
        "samples_per_s": args.batch * len(timed) / elapsed,
        "tokens_per_s": real / elapsed,
        "step_s": elapsed / len(timed),
        "mfu": flops / elapsed / (args.peak_tflops * 1e12),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
        "padding": 1 - real / padded,
    }


def profile_step(embedder: Embedder, optimizer, batches, args, device) -> None:
    """One naive step under torch.profiler (after a warm-up step): where the device time goes."""
    from torch.profiler import ProfilerActivity, profile

    one = argparse.Namespace(**{**vars(args), "warmup": 1})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_mode("naive", embedder, optimizer, batches[:2], one, device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="queries per step (and positives, and hard negatives)")
    ap.add_argument("--query-len", type=int, default=64)
    ap.add_argument("--median", type=int, default=450, help="median document length in tokens")
    ap.add_argument("--cap", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=None, help="padded-token budget per planned sub-batch")
    ap.add_argument("--overhead-tokens", type=int, default=OVERHEAD_TOKENS, help="planner's cost of one more forward")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device")
    ap.add_argument("--ranks", type=int, default=8, help="simulated training ranks for the sub-batch agreement line")
    ap.add_argument("--tiny", action="store_true", help="tiny model, short documents, fp32 on CPU: a smoke run")
    ap.add_argument("--fp32-adapters", action="store_true", help="peft's fp32 adapters (the DDP backend's case)")
    ap.add_argument("--cudnn-attention", action="store_true", help="keep cuDNN SDPA on (the training job turns it off)")
    ap.add_argument("--profile", action="store_true", help="print the top device kernels of one naive step first")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.layers, args.median, args.cap, args.batch, args.query_len = 2, 64, 256, 8, 16
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        args.overhead_tokens = min(args.overhead_tokens, 32)  # lengths are ~7x shorter
    dims = TINY if args.tiny else DREAM_7B
    args.hidden, args.layers_built = dims["hidden_size"], args.layers
    dtype = "bf16" if device.type == "cuda" else "fp32"

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = write_tiny_checkpoint("dream", Path(tmp, "dream"), layers=args.layers,
                                     max_positions=max(2048, args.cap), **dims)
        built = time.perf_counter() - started
        embedder = Embedder(EmbedderConfig(model=str(path), dtype=dtype, device=str(device)))
    cfg = TrainConfig.from_dict({
        "embedder": {"model": str(path)},
        "data": {"train_files": ["synthetic"]},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "optim": {"gradient_checkpointing": True},
    })
    torch.manual_seed(0)
    embedder.model = build_trainable(embedder, cfg)
    if device.type == "cuda" and not args.fp32_adapters:
        # As the training job's DeepSpeed bf16 engine does: every parameter, the LoRA adapters too, computes in
        # bf16 (DeepSpeed's optimizer keeps the fp32 masters). peft alone keeps adapters in fp32, so every
        # projection would cast its input to fp32 and run an fp32 GEMM (seen in the H100 profile).
        embedder.model.to(torch.bfloat16)
    if not args.cudnn_attention:
        use_training_attention(device)
    trainable = [p for p in embedder.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    vocab = min(len(embedder.tokenizer), 500)
    batches = [step_groups(args, vocab, seed) for seed in range(args.warmup + args.steps)]
    naive_pad = np.mean([padding_fraction([len(s.ids) for s in g], [list(range(len(g)))])
                         for b in batches for g in b[1:]])
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"{args.layers} layers at hidden {args.hidden}, checkpoint built in {built:.0f} s; "
          f"LoRA params {sum(p.numel() for p in trainable) / 1e6:.2f} M; document padding in one batch {naive_pad:.1%}")
    print(rank_agreement(args))

    if args.profile:
        profile_step(embedder, optimizer, batches, args, device)
    results = {}
    for mode in ("naive", "planned"):
        results[mode] = run_mode(mode, embedder, optimizer, batches, args, device)
        r = results[mode]
        print(f"{mode:8s} samples/s {r['samples_per_s']:8.2f}  tokens/s {r['tokens_per_s']:10.0f}  "
              f"step {r['step_s'] * 1e3:8.1f} ms  MFU {r['mfu']:6.1%}  peak {r['peak_gib']:6.2f} GiB  "
              f"padding {r['padding']:5.1%}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    n, p = results["naive"], results["planned"]
    print(f"SUMMARY device={device.type} layers={args.layers} naive_samples_s={n['samples_per_s']:.2f} "
          f"planned_samples_s={p['samples_per_s']:.2f} ratio_planned_over_naive={p['samples_per_s'] / n['samples_per_s']:.2f} "
          f"mfu_naive={n['mfu']:.1%} mfu_planned={p['mfu']:.1%} peak_gib_naive={n['peak_gib']:.2f} "
          f"peak_gib_planned={p['peak_gib']:.2f} padding_naive={n['padding']:.1%} padding_planned={p['padding']:.1%}")


if __name__ == "__main__":
    main()
