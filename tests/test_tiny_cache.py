"""`tiny:<family>` checkpoints in a shared cache: built once, whole, by any number of processes and threads at
once (also on torch.distributed ranks other than 0); half-written entries are rebuilt, never loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from diffembed.testing import tiny
from diffembed.testing.tiny import MARKER, ensure_tiny_checkpoint, write_tiny_checkpoint

TOKENIZER_FILES = ("merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json")


def assert_loadable(path: Path) -> None:
    """Every file of the entry parses, independently of the code under test."""
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors.index.json", MARKER, *TOKENIZER_FILES} <= names, sorted(names)
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen2"
    shards = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as fh:
            assert list(fh.keys())
    assert Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size() > 100


def leftovers(root: Path) -> list[str]:
    """Everything in the cache root but the published entries and the lock files."""
    return sorted(p.name for p in root.iterdir() if p.name not in tiny.TINY_FAMILIES and not p.name.endswith(".lock"))


# Each process: several threads wait at a gate, then all ask for the entry at once. Only the builder imports
# torch and transformers (tiny.py imports them where it writes), so the waiting processes start fast.
WORKER = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    import diffembed.testing.tiny as tiny

    builds = []
    real_write = tiny.write_tiny_checkpoint
    def counted(*args, **kwargs):
        builds.append(1)
        return real_write(*args, **kwargs)
    tiny.write_tiny_checkpoint = counted

    root, gate, threads = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    results = [None] * threads
    def call(i):
        while not gate.exists():
            time.sleep(0.005)
        try:
            path = tiny.ensure_tiny_checkpoint("qwen2", root)
            json.loads((path / "config.json").read_text())
            results[i] = str(path)
        except Exception as exc:
            results[i] = f"ERROR {exc.__class__.__name__}: {exc}"
    pool = [threading.Thread(target=call, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    print("READY", flush=True)
    for t in pool:
        t.join()
    print(json.dumps({"results": results, "builds": len(builds)}), flush=True)
""")


def test_processes_and_threads_at_once_build_one_complete_entry(tmp_path):
    root, gate = tmp_path / "cache", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(gate), "4"], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    try:
        for proc in procs:  # all started, all threads waiting: open the gate for 12 simultaneous calls
            assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        gate.touch()
        outs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    results = [r for report in reports for r in report["results"]]
    assert results == [str(root / "qwen2")] * 12, results
    assert sum(report["builds"] for report in reports) == 1  # one builder; the others waited for it
    assert_loadable(root / "qwen2")
    assert leftovers(root) == []


def test_threads_of_one_process_share_tiny_checkpoint_path(tmp_path, monkeypatch):
    """What failed before (one temp dir per pid): JSONDecodeError, FileNotFoundError, SafetensorError."""
    from diffembed.models.loading import tiny_checkpoint_path

    monkeypatch.setenv("DIFFEMBED_CACHE", str(tmp_path))
    barrier = threading.Barrier(6)

    def call(_):
        barrier.wait()
        return tiny_checkpoint_path("qwen2")

    with ThreadPoolExecutor(6) as pool:
        paths = list(pool.map(call, range(6)))
    assert paths == [tmp_path / "tiny" / "qwen2"] * 6
    assert_loadable(paths[0])
    from diffembed.config import EmbedderConfig
    from diffembed.models.loading import load_backbone

    assert load_backbone(EmbedderConfig(model="tiny:qwen2")).path == paths[0]
    assert leftovers(tmp_path / "tiny") == []


def test_a_rank_other_than_0_writes_the_whole_checkpoint(tmp_path):
    """Under torch.distributed, transformers' save_pretrained writes nothing on a rank other than 0: a Ray Train
    worker of rank 1 that built `tiny:qwen2` first published a folder of tokenizer files only."""
    import torch.distributed as dist

    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    if dist.is_initialized():
        pytest.skip("this process already has a torch.distributed process group")
    dist.init_process_group("fake", rank=1, world_size=2, store=fake_pg.FakeStore())
    try:
        path = ensure_tiny_checkpoint("qwen2", tmp_path)
    finally:
        dist.destroy_process_group()
    assert_loadable(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A complete qwen2 entry made by ensure_tiny_checkpoint, to copy (parts of) into fresh roots."""
    root = tmp_path_factory.mktemp("built")
    return ensure_tiny_checkpoint("qwen2", root)


def _plant_tokenizer_only(built: Path, entry: Path) -> None:
    # Exactly what a fresh machine's ~/.cache/diffembed/tiny/qwen2 held.
    entry.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy(built / name, entry / name)


def _plant_truncated_config(built: Path, entry: Path) -> None:
    shutil.copytree(built, entry)
    (entry / MARKER).unlink()
    (entry / "config.json").write_text((built / "config.json").read_text()[:40])


def _plant_stale_marker(built: Path, entry: Path) -> None:
    shutil.copytree(built, entry)  # whole, but from another generator version
    marker = json.loads((entry / MARKER).read_text())
    (entry / MARKER).write_text(json.dumps({**marker, "stamp": "0" * 16}))


def _plant_shard_truncated_after_the_marker(built: Path, entry: Path) -> None:
    shutil.copytree(built, entry)
    shard = next(entry.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])


@pytest.mark.parametrize("plant", [_plant_tokenizer_only, _plant_truncated_config, _plant_stale_marker,
                                   _plant_shard_truncated_after_the_marker])
def test_a_partial_or_stale_entry_is_rebuilt_never_loaded(built, tmp_path, monkeypatch, plant):
    from diffembed.models.loading import tiny_checkpoint_path

    root = tmp_path / "cache"
    entry = root / "tiny" / "qwen2"
    plant(built, entry)
    (root / "tiny" / ".qwen2.4242").mkdir()  # an old-style temp dir of a writer that died
    (root / "tiny" / ".qwen2.4242" / "tokenizer.json").write_text("{")
    monkeypatch.setenv("DIFFEMBED_CACHE", str(root))
    assert tiny_checkpoint_path("qwen2") == entry
    assert_loadable(entry)
    assert leftovers(root / "tiny") == []


def test_a_complete_entry_is_reused_not_rebuilt(built, tmp_path, monkeypatch):
    from diffembed.models.loading import tiny_checkpoint_path

    root = tmp_path / "cache"
    entry = root / "tiny" / "qwen2"
    shutil.copytree(built, entry)
    before = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    time.sleep(0.01)

    def no_build(*args, **kwargs):
        raise AssertionError("a complete entry was rebuilt")

    monkeypatch.setattr(tiny, "write_tiny_checkpoint", no_build)
    monkeypatch.setenv("DIFFEMBED_CACHE", str(root))
    assert tiny_checkpoint_path("qwen2") == entry
    assert ensure_tiny_checkpoint("qwen2", root / "tiny") == entry
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == before
    assert entry.stat().st_mode & 0o777 == 0o755  # readable by everyone sharing the cache


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(family, directory, **kwargs):
        write_tiny_checkpoint(family, directory)
        (Path(directory) / "config.json").unlink()  # e.g. a writer that silently skipped the model files

    monkeypatch.setattr(tiny, "write_tiny_checkpoint", broken)
    with pytest.raises(ValueError, match="no config.json"):
        ensure_tiny_checkpoint("qwen2", tmp_path)
    assert leftovers(tmp_path) == [] and not (tmp_path / "qwen2").exists()


def test_mistral_tokenizer_is_sentencepiece_style(tmp_path):
    """Like Mistral-7B-Instruct-v0.2: Metaspace "▁", byte fallback, `<unk>` `<s>` `</s>` at 0-2, `<s>` prepended;
    Llama-3 stays byte-level BPE."""
    from transformers import AutoTokenizer

    path = write_tiny_checkpoint("mistral", tmp_path / "mistral")
    raw = json.loads((path / "tokenizer.json").read_text())
    assert raw["pre_tokenizer"] == {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                                    "split": False}
    assert raw["model"]["type"] == "BPE" and raw["model"]["byte_fallback"] and raw["model"]["unk_token"] == "<unk>"
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    tok = AutoTokenizer.from_pretrained(str(path))
    assert [tok.convert_ids_to_tokens(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tok.convert_ids_to_tokens(3) == "<0x00>" and tok.convert_ids_to_tokens(258) == "<0xFF>"
    for text in ["Retrieve relevant passages that answer the query.", "naïve café 🙂 ünïcödé", "a  b\tc\nd", "x"]:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id == 1 and tok.unk_token_id not in ids
        assert tok.convert_ids_to_tokens(ids[1]).startswith("▁")
        assert tok.decode(ids, skip_special_tokens=True) == text
    emoji = tok("🙂", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(emoji)[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]  # byte fallback

    llama = json.loads((write_tiny_checkpoint("llama", tmp_path / "llama") / "tokenizer.json").read_text())
    assert llama["pre_tokenizer"]["type"] == "ByteLevel" and llama["decoder"]["type"] == "ByteLevel"
