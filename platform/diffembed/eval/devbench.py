"""A development benchmark of the held-out long-document check's shape, built offline from installed docs.

The held-out check (issue 16) pairs a one-line description (the query) with the rest of a real technical
document (its single relevant passage). We tune on a benchmark of the same shape that any machine with the
same venv rebuilds bit for bit: the docstrings of a fixed list of standard-library and installed-package
modules (`MODULES`). For each public module, class, function and method:

- query = the docstring's summary (its first paragraph, 3-40 words);
- document = `<qualified name><signature>` then the rest of the docstring (the summary removed);
- kept only when the rest has at least `min_words` words (80: a median near 190 words, ~460 MiniLM tokens);
  exact and near-duplicate documents (MinHash over
  5-word shingles, Jaccard >= 0.7) and repeated summaries are dropped (first by id kept), so every query has
  exactly one relevant document.

Documents are ordered by a hash of their id (not by module) and dealt out: test positives, dev positives,
corpus-only distractors, then training pairs from documents outside the corpus (disjoint from test and dev).
Written as a BEIR folder (`corpus.jsonl`, `queries.jsonl`, `qrels/test.tsv`, `qrels/dev.tsv`) plus
`train.jsonl` (`{query, positive, source}` rows the train job reads) and `stats.json`.

    python -m diffembed.eval.devbench OUT_DIR [--docs 2000] [--test 600] [--dev 200] [--train 1500]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from pydantic import Field

from diffembed.config import ConfigModel

# Fixed, so the benchmark is the same on every machine with the same interpreter and venv.
STDLIB = """
    abc argparse array ast asyncio base64 bisect bz2 calendar cmath codecs collections concurrent.futures
    configparser contextlib copy csv dataclasses datetime decimal difflib dis doctest email.message
    email.utils enum fnmatch fractions ftplib functools gettext glob graphlib gzip hashlib heapq hmac
    html.parser http.client http.cookiejar http.server imaplib importlib importlib.metadata inspect io
    ipaddress itertools json locale logging logging.handlers lzma mailbox math mimetypes
    multiprocessing.pool operator os os.path pathlib pickle pkgutil platform plistlib poplib pprint
    queue random re sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3
    ssl statistics string struct subprocess sys sysconfig tarfile tempfile textwrap threading time timeit
    tokenize traceback tracemalloc turtle types typing unicodedata unittest unittest.mock urllib.parse
    urllib.request uuid warnings weakref xml.dom.minidom xml.etree.ElementTree zipfile zlib zoneinfo
""".split()
PACKAGES = """
    numpy numpy.linalg numpy.fft numpy.random numpy.polynomial.polynomial numpy.ma numpy.lib.stride_tricks
    pandas pandas.api.types networkx networkx.algorithms.shortest_paths.generic
    networkx.algorithms.centrality networkx.algorithms.community networkx.algorithms.flow
    pyarrow pyarrow.compute pyarrow.parquet pyarrow.csv
    matplotlib.pyplot matplotlib.colors jinja2 click pydantic yaml requests httpx regex pygments.lexers
    dateutil.parser dateutil.relativedelta sympy sympy.solvers sympy.simplify sympy.integrals
    torch torch.nn torch.nn.functional torch.linalg torch.optim torch.fft torch.utils.data ray.data datasets
""".split()
MODULES = STDLIB + PACKAGES

SHINGLE = 5  # words per shingle for near-duplicate detection
PERMUTATIONS = 32  # MinHash size
BANDS = 16  # LSH bands of PERMUTATIONS / BANDS rows: candidates above Jaccard ~0.5 meet in some band
NEAR_DUPLICATE = 0.7  # Jaccard of shingle sets at or above which the later document is dropped
MAX_QUERY_WORDS = 40
MIN_QUERY_WORDS = 3
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->\s*.+)?$")  # C functions put their signature first


class DevbenchConfig(ConfigModel):
    """Sizes of the benchmark's parts; documents are drawn in a fixed order, so smaller sizes are prefixes."""

    modules: list[str] = Field(default_factory=lambda: list(MODULES), min_length=1)
    docs: int = Field(2000, ge=2, description="Documents in the corpus (test + dev positives and distractors).")
    test: int = Field(600, ge=1, description="Test queries (one relevant document each).")
    dev: int = Field(200, ge=1, description="Dev queries for tuning (fusion weight, ...), disjoint from test.")
    train: int = Field(1500, ge=0, description="Training pairs, from documents outside the corpus.")
    min_words: int = Field(80, ge=1, description="Documents whose text (without the signature) is shorter are dropped.")


@dataclass
class DocItem:
    """One documented object: its qualified name, its summary (the query) and the rest (the document)."""

    id: str
    query: str
    text: str
    words: int  # of the docstring's rest, without the signature line


def _signature(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def split_docstring(doc: str) -> tuple[str, str, str]:
    """(signature line or '', summary paragraph, rest) of a cleaned docstring."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", doc.strip()) if p.strip()]
    signature = ""
    if paragraphs and _SIGNATURE_LINE.match(paragraphs[0].splitlines()[0].strip()):
        head = paragraphs[0].splitlines()
        signature, rest_of_head = head[0].strip(), "\n".join(head[1:]).strip()
        paragraphs = ([rest_of_head] if rest_of_head else []) + paragraphs[1:]
    if not paragraphs:
        return signature, "", ""
    return signature, " ".join(paragraphs[0].split()), "\n\n".join(paragraphs[1:])


def make_item(name: str, obj: Any) -> DocItem | None:
    """The query/document pair of one documented object, or None when its docstring has no usable summary."""
    doc = inspect.getdoc(obj) if not isinstance(obj, ModuleType) else inspect.cleandoc(obj.__doc__ or "")
    if not doc:
        return None
    head_signature, summary, rest = split_docstring(doc)
    n_query = len(summary.split())
    if not (MIN_QUERY_WORDS <= n_query <= MAX_QUERY_WORDS) or not rest:
        return None
    if isinstance(obj, ModuleType):
        header = f"module {name}"
    else:
        short = name.rsplit(".", 1)[-1]
        signature = _signature(obj) or (head_signature[head_signature.find("("):] if head_signature else "")
        header = f"{name.rsplit('.', 1)[0]}.{short}{signature}"
    return DocItem(id=name, query=summary, text=f"{header}\n\n{rest}", words=len(rest.split()))


def _defined_in(obj: Any, module: ModuleType) -> bool:
    origin = (getattr(obj, "__module__", None) or "").split(".")[0].lstrip("_")
    return origin == module.__name__.split(".")[0].lstrip("_")


def module_items(name: str) -> list[DocItem]:
    """The module's own docstring, its public classes and functions, and their public methods."""
    with warnings.catch_warnings():  # deprecated modules and aliases warn on import and access
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except Exception:  # a module missing on this build (no _ssl, no tkinter) is left out
            return []
        items = [make_item(name, module)]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            if not _defined_in(obj, module):
                continue
            items.append(make_item(f"{name}.{attr}", obj))
            if inspect.isclass(obj):
                for meth, member in sorted(vars(obj).items()):
                    if not meth.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                        items.append(make_item(f"{name}.{attr}.{meth}", member))
    return [i for i in items if i is not None]


def _shingles(text: str) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + SHINGLE]) for i in range(max(1, len(words) - SHINGLE + 1))}


def _minhash(shingles: set[str]) -> np.ndarray:
    """(PERMUTATIONS,) minimum hash per seed; equal slots estimate the Jaccard similarity."""
    hashes = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                       for s in shingles], dtype=np.uint64)  # (S,)
    seeds = np.random.default_rng(0).integers(1, 2**63, size=PERMUTATIONS, dtype=np.uint64)  # (P,)
    mixed = (hashes[None, :] * (seeds[:, None] | np.uint64(1))) ^ (seeds[:, None] >> np.uint64(7))  # (P, S)
    return mixed.min(axis=1)


def deduplicate(items: list[DocItem]) -> list[DocItem]:
    """Drop repeated ids, repeated summaries and (near-)duplicate documents; the first by id is kept."""
    kept: list[DocItem] = []
    seen_ids: set[str] = set()
    seen_queries: set[str] = set()
    buckets: dict[tuple[int, bytes], list[int]] = {}
    shingle_sets: list[set[str]] = []
    rows = PERMUTATIONS // BANDS
    for item in sorted(items, key=lambda i: i.id):
        query_key = " ".join(item.query.lower().split())
        if item.id in seen_ids or query_key in seen_queries:
            continue
        body = item.text.split("\n\n", 1)[-1]  # compare the docstring, not the (different) names
        shingles = _shingles(body)
        signature = _minhash(shingles)
        keys = [(b, signature[b * rows : (b + 1) * rows].tobytes()) for b in range(BANDS)]
        candidates = {j for key in keys for j in buckets.get(key, [])}
        if any(len(shingles & shingle_sets[j]) / len(shingles | shingle_sets[j]) >= NEAR_DUPLICATE
               for j in candidates):
            continue
        for key in keys:
            buckets.setdefault(key, []).append(len(kept))
        shingle_sets.append(shingles)
        kept.append(item)
        seen_ids.add(item.id)
        seen_queries.add(query_key)
    return kept


def _order(item: DocItem) -> str:
    return hashlib.sha256(item.id.encode()).hexdigest()


def collect(cfg: DevbenchConfig) -> list[DocItem]:
    """Every usable document of `cfg.modules`, deduplicated, in the benchmark's fixed (hashed) order."""
    items = [i for name in cfg.modules for i in module_items(name) if i.words >= cfg.min_words]
    return sorted(deduplicate(items), key=_order)


def build(cfg: DevbenchConfig, out_dir: str | Path) -> dict[str, Any]:
    """Write the benchmark under `out_dir`; returns its statistics (also written to stats.json)."""
    if cfg.test + cfg.dev > cfg.docs:
        raise ValueError(f"test ({cfg.test}) + dev ({cfg.dev}) queries need at least as many documents; "
                         f"docs={cfg.docs}")
    pool = collect(cfg)
    if len(pool) < cfg.docs:
        raise ValueError(f"only {len(pool)} usable documents in the module list; ask for --docs {len(pool)} or fewer")
    test, dev = pool[: cfg.test], pool[cfg.test : cfg.test + cfg.dev]
    corpus = pool[: cfg.docs]
    train = pool[cfg.docs : cfg.docs + cfg.train]  # outside the corpus: disjoint from every judged document

    out = Path(out_dir)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    by_id = sorted(corpus, key=lambda d: d.id)
    _write_jsonl(out / "corpus.jsonl", ({"_id": d.id, "title": "", "text": d.text} for d in by_id))
    _write_jsonl(out / "queries.jsonl", ({"_id": f"q:{d.id}", "text": d.query} for d in test + dev))
    for split, items in (("test", test), ("dev", dev)):
        with open(out / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"q:{d.id}\t{d.id}\t1\n" for d in items)
    _write_jsonl(out / "train.jsonl", ({"query": d.query, "positive": d.text, "source": "devbench"} for d in train))

    words = np.array([len(d.text.split()) for d in corpus])
    stats = {
        "documents": len(corpus), "test_queries": len(test), "dev_queries": len(dev), "train_pairs": len(train),
        "pool": len(pool), "modules": len(cfg.modules),
        "words": {"median": int(np.median(words)), "mean": round(float(words.mean()), 1),
                  "p90": int(np.percentile(words, 90)), "max": int(words.max())},
        "python": sys.version.split()[0],
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the offline development benchmark (BEIR layout + train pairs).")
    parser.add_argument("out_dir")
    parser.add_argument("--docs", type=int, default=2000, help="documents in the corpus (default 2000)")
    parser.add_argument("--test", type=int, default=600, help="test queries (default 600)")
    parser.add_argument("--dev", type=int, default=200, help="dev queries (default 200)")
    parser.add_argument("--train", type=int, default=1500, help="training pairs (default 1500)")
    parser.add_argument("--min-words", type=int, default=80, help="shortest document kept, in words (default 80)")
    args = parser.parse_args(argv)
    try:
        cfg = DevbenchConfig(docs=args.docs, test=args.test, dev=args.dev, train=args.train, min_words=args.min_words)
        stats = build(cfg, args.out_dir)
    except ValueError as exc:  # ConfigError and pydantic's ValidationError are ValueErrors
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
