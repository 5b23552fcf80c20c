"""The training job end to end on a real local Ray cluster: 2 workers on gloo, CPU; DeepSpeed ZeRO or plain DDP."""

from __future__ import annotations

import json
import os
import random
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffembed import Embedder, EmbedderConfig
from diffembed.train.config import TrainConfig
from diffembed.train.checkpoints import METRICS_FILE, PROBE_FILE
from diffembed.train.deepspeed import SHM_COMM_OP
from diffembed.train.loop import REPORT_POLL_ENV, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "train_tiny.yaml"


def tiny_config(tmp_path, tiny_checkpoints, *overrides) -> TrainConfig:
    return TrainConfig.from_yaml(
        TINY, [f"embedder.model={tiny_checkpoints['dream']}", f"run.storage_path={tmp_path}", *overrides]
    )


def history(cfg: TrainConfig) -> list[dict]:
    return json.loads((cfg.export_path / "train_history.json").read_text())


def assert_export_matches_probe(export: Path, probe_file: Path, base_model: Path) -> None:
    """The export, loaded by the Embedder, embeds like the model at the end of training (the probe it saved),
    and unlike the untrained backbone."""
    probe = json.loads(probe_file.read_text())
    exported = Embedder(EmbedderConfig(model=str(export))).encode_documents(probe["texts"])
    trained = np.asarray(probe["embeddings"], dtype=np.float32)
    cos = (exported * trained).sum(1) / np.linalg.norm(exported, axis=1) / np.linalg.norm(trained, axis=1)
    assert cos.min() > 0.9999
    base = Embedder(EmbedderConfig(model=str(base_model), max_length=64))
    assert float((base.encode_documents(probe["texts"]) * exported).sum(1).min()) < 0.999


def assert_learnt_checkpointed_and_exported(cfg: TrainConfig, metrics: dict, tiny_checkpoints) -> None:
    """A 16-step run of train_tiny.yaml: every step once in order, a lower loss on the second pass over the data,
    checkpoints, and an export that the Embedder loads and that embeds like the model at the end of training."""
    assert metrics["step"] == cfg.optim.max_steps == 16
    steps = sorted(history(cfg), key=lambda h: h["step"])
    assert [h["step"] for h in steps] == list(range(1, 17))  # steps of a lost attempt are not in it twice
    losses = [h["loss"] for h in steps]
    times = [h["time"] for h in steps]  # each step's end, wall clock
    assert times == sorted(times) and times[0] > 1.7e9, times
    # The controller polls at run.report_poll_s (0.25 s), not Ray's 2 s, through Ray's own variable, which Ray
    # Train passes from the driver to the controller in fit(); the driver's environment is as it was afterwards.
    assert REPORT_POLL_ENV == "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" and cfg.run.report_poll_s == 0.25
    assert REPORT_POLL_ENV not in os.environ
    # Two epochs over the same 8 batches: the second pass has a lower loss than the first.
    assert np.mean(losses[8:]) < np.mean(losses[:8]), losses
    assert len([p for p in cfg.run_dir.glob("checkpoint_*") if p.is_dir()]) >= 1
    export = Path(metrics["export_dir"])
    for name in ("model.safetensors", "config.json", "diffembed.json", "loss.png", "tokenizer_config.json"):
        assert (export / name).is_file(), name
    # The exported model, loaded by the Embedder, embeds like the model at the end of training.
    # ... and differs from the untrained backbone (LoRA was merged, not dropped).
    assert_export_matches_probe(export, Path(metrics["checkpoint_dir"]) / PROBE_FILE, tiny_checkpoints["dream"])
    saved = json.loads((export / "diffembed.json").read_text())
    assert (saved["family"], saved["attention"], saved["pooling"]) == ("qwen2", "bidirectional", "mean")
    # DeepSpeed on the CPU accelerator did not JIT-build its shared-memory all-reduce op (inference only, 40 s):
    # the workers share this run's (initially empty) torch-extensions cache
    assert not list(Path(os.environ["TORCH_EXTENSIONS_DIR"]).rglob(f"{SHM_COMM_OP}*"))


def test_zero3_training_restarts_learns_checkpoints_and_exports(ray_cluster, tmp_path, tiny_checkpoints):
    """ZeRO-3 with a persistence threshold of 0: even the tiny model's parameters are partitioned and gathered in
    every forward, as a 7B's are, so the workers must run their length-planned chunks in step
    (microbatch.plan_groups). It also loses a worker at step 6: Ray Train restarts the group from the step-4
    checkpoint (checkpoint_every 4), so ZeRO-3's partitioned checkpoint is restored. (ZeRO-2: the run of
    test_resume_an_earlier_run.)"""
    cfg = tiny_config(tmp_path, tiny_checkpoints, "deepspeed.zero_stage=3", "loss.grad_cache_chunk_size=3",
                      "deepspeed.zero_options.stage3_param_persistence_threshold=0", "run.fail_at_step=6")
    metrics = train(cfg)
    assert metrics["attempt"] == 1  # the second attempt finished the run
    assert_learnt_checkpointed_and_exported(cfg, metrics, tiny_checkpoints)


def nonsense_task(seed: int = 0):
    """Queries in made-up words ("blorf quim") for documents in English ("a red zebra ..."): MiniLM cannot
    know the mapping, fine-tuning can learn it; held-out queries combine words seen in other pairs."""
    rng = random.Random(seed)
    animals = ["zebra", "otter", "falcon", "badger", "lizard", "walrus", "beetle", "heron"]
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]

    def word():
        return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))

    code = {w: word() for w in animals + colors}
    rows = []
    for a in animals:
        for c in colors:
            rows.append({"query": f"{code[a]} {code[c]}", "positive": f"A {c} {a} was seen near the river today."})
    rng.shuffle(rows)
    for i, row in enumerate(rows):  # a hard negative: same animal, another colour
        other = rows[(i + 1) % len(rows)]["positive"]
        row["negatives"] = [other]
    return rows[:48], rows[48:]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_finetuning_minilm_raises_ndcg(ray_cluster, tmp_path):
    train_rows, dev_rows = nonsense_task()
    cfg = TrainConfig.from_dict(
        {
            "embedder": {"model": "all-MiniLM-L6-v2", "max_length": 32},
            "data": {"train_files": [str(write_jsonl(tmp_path / "train.jsonl", train_rows))]},
            "eval": {"dev_files": [str(write_jsonl(tmp_path / "dev.jsonl", dev_rows))], "every": 18},
            "lora": {"enabled": False},
            "optim": {"lr": 2e-4, "warmup_steps": 3, "max_steps": 36, "global_batch_size": 16},
            "loss": {"scale": 20.0},
            "deepspeed": {"zero_stage": 2},
            "run": {"name": "minilm", "storage_path": str(tmp_path), "num_workers": 2, "checkpoint_every": 36},
        }
    )
    metrics = train(cfg)
    before, after = metrics["dev_ndcg@10_before"], metrics["dev_ndcg@10"]
    assert after > before + 0.1, (before, after)
    during = [h for h in history(cfg) if "dev_ndcg@10" in h]  # evaluated in the loop every 18 steps
    assert [h["step"] for h in during] == [18, 36]
    assert abs(during[-1]["dev_ndcg@10"] - after) < 0.02  # the exported model scores as the trained one did
    # The export is still a sentence-transformers model directory.
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(metrics["export_dir"], device="cpu")
    ours = Embedder(EmbedderConfig(model=metrics["export_dir"])).encode_documents(["a red zebra"])
    assert float(st.encode(["a red zebra"], normalize_embeddings=True)[0] @ ours[0]) > 0.9999


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["deepspeed.zero_stage=5"], "zero_stage"),
        (["bogus_key=1"], "bogus_key"),
        (["data.train_files=[/nonexistent/pairs.jsonl]"], "/nonexistent/pairs.jsonl"),
        (["optim.global_batch_size=7"], "divisible"),
        (["deepspeed.zero_stage=3", "deepspeed.zero_options.stage3_prefetch_bucket_sise=1"], "bucket_sise: Extra"),
    ],
)
def test_bad_config_fails_before_ray(overrides, needle):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(TINY), *overrides],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "ray" not in proc.stdout.lower()


def test_a_run_directory_holds_one_run(tmp_path, tiny_checkpoints):
    """Ray Train continues whatever run it finds under `<storage_path>/<name>`: the same config (a driver that died,
    run again) continues; another config is refused instead of silently continuing the old run (its data, its
    steps: with the old run finished, nothing would be trained and the old model exported again)."""
    from diffembed.config import ConfigError
    from diffembed.train import rundir

    first = tiny_config(tmp_path, tiny_checkpoints)
    assert rundir.claim(first) is False and (first.run_dir / rundir.RECORD).is_file()
    other = tiny_config(tmp_path, tiny_checkpoints, "optim.max_steps=99", "data.shuffle_seed=3")
    assert rundir.claim(other) is False  # no checkpoint yet (the first attempt failed early): a new run
    (first.run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir()  # now it has one: it is `other`'s
    assert rundir.claim(other) is True
    assert rundir.claim(tiny_config(tmp_path, tiny_checkpoints, "optim.max_steps=99", "data.shuffle_seed=3",
                                    "run.max_failures=7", "run.log_every=1")) is True  # how, not what: the same run
    with pytest.raises(ConfigError, match=r"already holds run 'train-tiny' with another config \(differs in: "
                                          r"data.shuffle_seed, optim.max_steps\); rerun it unchanged to continue it, or give this run "
                                          r"another run.name \(with --resume .*/train-tiny to start from"):
        rundir.claim(first)
    with pytest.raises(ConfigError, match=r"differs in: --resume\)"):
        rundir.claim(other, resume=str(tmp_path / "elsewhere"))
    stranger = tiny_config(tmp_path, tiny_checkpoints, "run.name=by-hand")
    (stranger.run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"no {rundir.RECORD}"):
        rundir.claim(stranger)


TRAIN_MAIN = runpy.run_path(str(ROOT / "jobs" / "train.py"))["main"]  # in this process: on the session's Ray


def test_train_cli_data_and_run_directory_errors_are_one_line(ray_cluster, capsys, tmp_path, tiny_checkpoints):
    """A bad row (found by the Ray tasks that read the data) and a run directory that holds another run: exit 2
    and one `error:` line each, never a traceback; the second before any Ray work."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": "q", "positive": "p", "negatives": ["n"]}) + "\n{oops\n")
    common = ["--config", str(TINY), f"embedder.model={tiny_checkpoints['dream']}", f"run.storage_path={tmp_path}"]
    assert TRAIN_MAIN([*common, f"data.train_files=[{bad}]", "data.bad_rows=fail"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}:2: bad training row: malformed JSON line "
                   "(Expecting property name enclosed in double quotes)"], err
    (tmp_path / "train-tiny" / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)  # another run's
    assert TRAIN_MAIN([*common, "optim.max_steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'train-tiny'} already holds run 'train-tiny' "
                                               "with another config (differs in: data.bad_rows, data.train_files, "
                                               "optim.max_steps)"), err
    assert TRAIN_MAIN([*common, "--resume", str(tmp_path / "nowhere")]) == 2  # neither a run nor a checkpoint
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --resume: no checkpoint_* directories in {tmp_path / 'nowhere'} (nor is it one)"], err


def test_what_the_workers_cannot_run_is_one_line_without_retries(ray_cluster, capsys, tmp_path, tiny_checkpoints):
    """Only the training workers can find out that their nodes cannot run the model (here flash-attn, not installed;
    likewise no CUDA, bf16 on an old GPU, no checkpoint at that path on a node). The two ranks agree on it and the
    job exits 2 with that reason as its one line, after one attempt: raised as a worker failure, it was retried
    `run.max_failures` times, reloading the model on every rank each time."""
    assert TRAIN_MAIN(["--config", str(TINY), f"embedder.model={tiny_checkpoints['dream']}",
                       f"run.storage_path={tmp_path}", "run.num_workers=2", "run.max_failures=2",
                       "deepspeed.enabled=false", "embedder.attn_implementation=flash_attention_2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # "raised on node": the ranks' agreed report (a worker failure, retried, ends as WorkerGroupError without it)
    assert len(err) == 1 and err[0].startswith(
        "error: attn_implementation flash_attention_2 needs the flash-attn package, which is not installed; use sdpa "
        "(the default) (raised on node "), err
    assert not list((tmp_path / "train-tiny").glob("checkpoint_*"))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def probe_of(checkpoint_dir) -> np.ndarray:
    return np.asarray(json.loads((Path(checkpoint_dir) / PROBE_FILE).read_text())["embeddings"], dtype=np.float32)


def test_resume_an_earlier_run(ray_cluster, tmp_path, tiny_checkpoints):
    """A ZeRO-2 run learns, checkpoints and exports. --resume continues it from one of its checkpoints (here the
    step-12 one; a run directory means its latest: test_uri_storage_path_trains_exports_and_resumes), which holds
    the LoRA adapter and its optimizer state but none of the frozen base weights, and ends where it ended."""
    import torch

    same = ["lora.r=2", "lora.alpha=4", "lora.dropout=0", "optim.schedule=constant", "run.checkpoint_every=4"]
    straight = tiny_config(tmp_path, tiny_checkpoints, "deepspeed.zero_stage=2", *same)
    reference = train(straight)
    assert reference["attempt"] == 0
    assert_learnt_checkpointed_and_exported(straight, reference, tiny_checkpoints)
    steps = {json.loads((p / METRICS_FILE).read_text())["step"]: p
             for p in straight.run_dir.glob("checkpoint_*") if p.is_dir()}
    assert sorted(steps) == [12, 16]  # run.keep_checkpoints: 2
    module = torch.load(steps[12] / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all("lora_" in name for name in module), sorted(module)[:4]  # no frozen weight saved
    base = sum(f.stat().st_size for f in Path(tiny_checkpoints["dream"]).glob("*.safetensors"))
    # DeepSpeed's files (beside them: its ~40 kB conversion scripts, metrics, history), against the base's weights.
    assert dir_bytes(steps[12] / "ds") < 0.25 * base, (dir_bytes(steps[12] / "ds"), base)

    again = tiny_config(tmp_path, tiny_checkpoints, "run.name=train-tiny-again", *same)
    metrics = train(again, resume=str(steps[12]))
    assert metrics["step"] == 16 and metrics["attempt"] == 1  # continued from step 12, did not start over
    assert [h["step"] for h in history(again)] == list(range(1, 17))
    np.testing.assert_allclose(probe_of(metrics["checkpoint_dir"]), probe_of(reference["checkpoint_dir"]),
                               atol=2e-4)
    losses = {h["step"]: h["loss"] for h in history(straight)}
    assert all(abs(h["loss"] - losses[h["step"]]) < 1e-4 for h in history(again)), (history(again), losses)


def test_uri_storage_path_trains_exports_and_resumes(ray_cluster, tmp_path, tiny_checkpoints, s3_bucket):
    """run.storage_path as an s3:// URI (the loopback S3 server of tests/s3.py): Ray Train writes checkpoints
    through it, the export is uploaded into it and loads back, and --resume finds the latest checkpoint by listing
    it. (file:// targets: tests/test_export.py.)"""
    from pyarrow.fs import FileSelector, FileType

    uri = s3_bucket.uri("store")
    first = tiny_config(tmp_path, tiny_checkpoints, "optim.max_steps=2", "run.checkpoint_every=2",
                        f"run.storage_path={uri}")
    assert first.run_uri == f"{uri}/train-tiny"
    metrics = train(first)
    assert metrics["export_dir"] == f"{uri}/train-tiny/export"
    listing = s3_bucket.fs.get_file_info(FileSelector(f"{s3_bucket.name}/store/train-tiny", recursive=True))
    names = {info.path.split("/train-tiny/", 1)[1] for info in listing if info.type == FileType.File}
    assert {"export/model.safetensors", "export/diffembed.json"} <= names
    assert any(n.startswith("checkpoint_") for n in names)
    assert not any(".partial" in n for n in names)
    local = tmp_path / "export-copy"
    local.mkdir()
    for name in (n for n in names if n.startswith("export/") and n.count("/") == 1):
        with s3_bucket.fs.open_input_stream(f"{s3_bucket.name}/store/train-tiny/{name}") as f:
            (local / name.split("/", 1)[1]).write_bytes(f.read())
    exported = Embedder(EmbedderConfig(model=str(local))).encode_documents(["a document about diffusion"])
    assert np.isfinite(exported).all()
    longer = tiny_config(tmp_path, tiny_checkpoints, "optim.max_steps=4", "run.checkpoint_every=2",
                         f"run.storage_path={uri}", "run.name=train-tiny-more")
    resumed = train(longer, resume=first.run_uri)
    assert resumed["step"] == 4 and resumed["attempt"] == 1


# ---------------------------------------------------------------- deepspeed.enabled: false (plain PyTorch DDP)


def lora_b_norm(state: dict) -> float:
    """LoRA's B matrices start at zero: their norm is how far training moved the adapter."""
    return float(sum(t.float().norm() for name, t in state.items() if "lora_B" in name))


def test_ddp_training_without_deepspeed_learns_checkpoints_restarts_and_exports(ray_cluster, tmp_path,
                                                                                tiny_checkpoints):
    """Plain PyTorch DDP with GradCache chunks; a worker lost at step 6: Ray Train restarts the group from the
    step-4 torch checkpoint, and the run ends learnt and exported as an uninterrupted one would."""
    import torch

    from diffembed.train.checkpoints import TORCH_DIR, TORCH_MODEL_FILE, TORCH_STATE_FILE

    cfg = tiny_config(tmp_path, tiny_checkpoints, "deepspeed.enabled=false", "loss.grad_cache_chunk_size=3",
                      "run.checkpoint_every=4", "run.fail_at_step=6")
    metrics = train(cfg)
    assert metrics["backend"] == "ddp" and metrics["step"] == 16
    assert metrics["attempt"] == 1  # restarted from the step-4 torch checkpoint
    steps = sorted(history(cfg), key=lambda h: h["step"])
    assert [h["step"] for h in steps] == list(range(1, 17))  # steps 5-6 of the lost attempt are not in it twice
    losses = [h["loss"] for h in steps]
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[8:]) < np.mean(losses[:8]), losses
    # Checkpoints reported in Ray Train's torch layout (rank 0's state dicts, no DeepSpeed shards).
    assert len([p for p in cfg.run_dir.glob("checkpoint_*") if p.is_dir()]) >= 1
    final = Path(metrics["checkpoint_dir"])
    assert (final / TORCH_DIR / TORCH_STATE_FILE).is_file() and not (final / "ds").exists()
    state = torch.load(final / TORCH_DIR / TORCH_MODEL_FILE, weights_only=True)
    assert state and all("lora_" in name for name in state)  # the adapter only
    assert lora_b_norm(state) > 0  # the weights moved
    # The export loads with the Embedder and embeds like the model at the end of training.
    export = Path(metrics["export_dir"])
    assert_export_matches_probe(export, final / PROBE_FILE, tiny_checkpoints["dream"])


def test_torch_backend_never_imports_deepspeed(monkeypatch, tmp_path, tiny_checkpoints):
    """The DDP path in one process (world 1): a step, a checkpoint, a resume and the export, with `import
    deepspeed` made to fail."""
    import sys

    import ray.train
    import torch

    from diffembed.train.export import export_from_checkpoint
    from diffembed.train.backends import TorchBackend, make_backend
    from diffembed.train.checkpoints import checkpoint_state_dict
    from diffembed.train.worker import build_trainable
    from diffembed.train.losses import info_nce

    for name in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")] + ["deepspeed"]:
        monkeypatch.setitem(sys.modules, name, None)  # any `import deepspeed...` now raises ImportError
    cfg = tiny_config(tmp_path, tiny_checkpoints, "deepspeed.enabled=false", "run.num_workers=1",
                      "optim.warmup_steps=0", "optim.lr=1e-2", f"run.export_dir={tmp_path / 'export'}")
    embedder = Embedder(cfg.embedder.model_copy(update={"device": "cpu"}))
    backend = make_backend(cfg, build_trainable(embedder, cfg), torch.device("cpu"), world=1)
    assert isinstance(backend, TorchBackend)
    embedder.model = backend.model
    texts = ["a query about retrieval", "diffusion models read both ways"]
    for _ in range(2):
        q = embedder.forward(embedder.collate(embedder.query_segments(texts, None)))
        p = embedder.forward(embedder.collate(embedder.document_segments(texts[::-1], windows="first")))
        loss = info_nce(q, p)
        backend.backward(loss)
        backend.step()
    assert torch.isfinite(loss)
    ckpt = tmp_path / "ckpt"
    assert backend.save(str(ckpt), {"step": 2, "attempt": 0}, rank=0)
    assert not backend.save(str(tmp_path / "other"), {"step": 2}, rank=1)  # only rank 0 writes
    state = checkpoint_state_dict(str(ckpt))
    assert lora_b_norm(state) > 0

    fresh = make_backend(cfg, build_trainable(Embedder(cfg.embedder.model_copy(update={"device": "cpu"})), cfg),
                         torch.device("cpu"), world=1)
    assert fresh.load(str(ckpt)) == {"step": 2, "attempt": 0}
    assert fresh.scheduler.last_epoch == 2 and fresh.optimizer.state  # optimizer/scheduler state came back
    assert all(torch.equal(state[n], p.detach().float()) for n, p in fresh.module.named_parameters() if n in state)

    export = export_from_checkpoint(cfg, ray.train.Checkpoint.from_directory(str(ckpt)))
    vectors = Embedder(EmbedderConfig(model=str(export))).encode_documents(texts)
    assert np.isfinite(vectors).all()
    with pytest.raises(ImportError):  # the guard was in force all along
        import deepspeed  # noqa: F401


DDP_STEP = r"""
import sys

import torch
import torch.distributed as dist

from diffembed import Embedder
from diffembed.train.config import TrainConfig
from diffembed.train.backends import make_backend
from diffembed.train.worker import build_trainable, train_step
from diffembed.train.losses import info_nce
from diffembed.train.microbatch import plan_groups

model, rank, world, chunk, init, out = sys.argv[1:7]
rank, world, chunk = int(rank), int(world), int(chunk) or None
if world > 1:
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=init)
cfg = TrainConfig.from_dict({
    "data": {"train_files": ["x.jsonl"]}, "embedder": {"model": model, "max_length": 512},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "deepspeed": {"enabled": False},
    "optim": {"global_batch_size": 4}, "run": {"num_workers": world},
})
torch.manual_seed(0)
embedder = Embedder(cfg.embedder.model_copy(update={"device": "cpu"}))
module = build_trainable(embedder, cfg)
with torch.no_grad():  # LoRA's B starts at zero (so A has no gradient): give every adapter weight one
    for name, p in module.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.05)
engine = make_backend(cfg, module, torch.device("cpu"), world)
embedder.model = engine.model
engine.step = lambda: None  # keep the step's gradients to compare
queries = ["red zebra", "blue otter", "green heron", "black walrus"]
# Two long and two short documents: each rank's length-planned groups are cut into several sub-batches, each run
# through DDP's forward before the one backward (or GradCache's), and put back in input order.
docs = ["A red zebra by the river. " * 60, "A blue otter swims.", "A green heron waits. " * 70, "A black walrus sleeps."]
lo, hi = rank * 4 // world, (rank + 1) * 4 // world
q = embedder.query_segments(queries[lo:hi], None)
p = embedder.document_segments(docs[lo:hi], windows="first")
n = embedder.document_segments(docs[::-1][lo:hi], windows="first")
print("sub-batches", [len(plan) for plan in plan_groups([[len(s.ids) for s in g] for g in (q, p, n)])])
train_step(embedder, engine, q, p, n, lambda q, p, n: info_nce(q, p, n, scale=20.0, gather=world > 1), chunk)
torch.save({name: p.grad for name, p in module.named_parameters() if p.requires_grad}, out)
"""


@pytest.mark.parametrize("chunk", [0, 1])
def test_ddp_step_gradients_equal_the_single_process_full_batch(tmp_path, tiny_checkpoints, chunk):
    """2 gloo ranks, each with half the batch (GradCache with 1-text chunks under no_sync, or one pass), end
    the backward with exactly the gradient of the full-batch loss in one process."""
    import torch

    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP)
    model = str(tiny_checkpoints["dream"])

    def launch(rank, world, chunk):
        out = tmp_path / f"grads_{world}_{rank}.pt"
        args = [sys.executable, str(script), model, str(rank), str(world), str(chunk),
                f"file://{tmp_path / 'rendezvous'}", str(out)]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out

    procs = [launch(0, 1, 0)] + [launch(rank, 2, chunk) for rank in range(2)]
    for i, (proc, _) in enumerate(procs):
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
        if i:  # each rank of two: one long and one short positive (and negative), cut into two sub-batches
            assert "sub-batches [1, 2, 2]" in output, output[-3000:]
    reference, *ranks = [torch.load(out, weights_only=True) for _, out in procs]
    assert reference and all(g is not None for g in reference.values())
    for grads in ranks:
        assert grads.keys() == reference.keys()
        for name, g in reference.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
