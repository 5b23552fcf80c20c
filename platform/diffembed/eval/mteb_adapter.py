"""Run MTEB tasks (incl. BRIGHT, LongEmbed, FollowIR) with a diffembed `Embedder`.

`MTEBEncoder` implements mteb 2.x's encoder protocol on top of the Embedder: queries go through
`encode_queries` with an instruction, documents through `encode_documents` with mteb's body and title kept
apart, so the embedder's document policy joins them as the batch job and the service do. `run_mteb` is the one-call entry point around `mteb.evaluate`.

mteb is an optional dependency (`pip install "diffembed[eval]"`); it is imported only when this module is used,
never by `import diffembed`.

Which instruction a query gets, first match wins:

1. the query's own instruction, when the task carries one per query (InstructionRetrieval/Reranking tasks such
   as FollowIR put it in the batch's `instruction` column);
2. `instructions[task name]`, then `instructions[task type]` (e.g. "Retrieval", "InstructionReranking");
3. the task's own prompt from its mteb metadata, when `use_task_prompts=True` (BRIGHT, for example, ships one);
4. the EmbedderConfig's `query_instruction` (None there: the query goes in as it is).

A mapped value of `""` or `None` means "no instruction" for that task. Symmetric tasks (STS, clustering,
classification: mteb passes no prompt type) are encoded as documents, without an instruction, unless the task
is named in `instructions`, in which case they are encoded as queries with that instruction.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np

from diffembed.config import RUNTIME_FIELDS, ConfigError, EmbedderConfig
from diffembed.documents import document_fields

if TYPE_CHECKING:
    from mteb.models.model_meta import ModelMeta
    from mteb.results import ModelResult

    from diffembed.models.embedder import Embedder

__all__ = ["MTEBEncoder", "model_meta", "result_path", "run_mteb", "summarize"]

# Sentinel: "no entry in the instruction map" (None in the map means "no instruction").
_MISSING = object()
# How inputs are batched and where they run does not change what a model is: same revision on CPU and GPU.
# Settings of the machine that runs the model, not of the model (dtype stays: bf16 scores differ from fp32).
_NOT_IN_REVISION = set(RUNTIME_FIELDS) - {"dtype"}


def _require_mteb():
    try:
        import mteb
    except ImportError as exc:  # pragma: no cover - exercised only where the extra is missing
        raise ImportError(
            "the MTEB adapter needs mteb: pip install 'diffembed[eval]' (or 'mteb>=2.26,<2.27')"
        ) from exc
    return mteb


def _as_embedder(embedder: Embedder | EmbedderConfig | str | None) -> Embedder:
    from diffembed.models.embedder import Embedder

    if isinstance(embedder, Embedder):
        return embedder
    if embedder is None or isinstance(embedder, str):
        config = EmbedderConfig() if embedder is None else EmbedderConfig(model=embedder)
    elif isinstance(embedder, EmbedderConfig):
        config = embedder
    else:
        raise TypeError(f"expected an Embedder, EmbedderConfig or model path, got {type(embedder).__name__}")
    return Embedder(config)


def _fingerprint(path: Path | None, digest: Any) -> None:
    """Name, size and modification time of a checkpoint's files: a retrained checkpoint gets a new revision."""
    if path is None or not path.is_dir():
        return
    for item in sorted(path.iterdir()):
        if item.is_file():
            stat = item.stat()
            digest.update(f"{item.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())


def default_name(config: EmbedderConfig) -> str:
    """`diffembed/<checkpoint>[+<adapter>]`: mteb wants `organisation/model` and uses it as a folder name."""
    def short(value: str) -> str:
        path = Path(value).expanduser()
        return path.name if path.is_absolute() or value.startswith((".", "~")) or path.is_dir() else value

    name = short(config.model).replace("/", "__")
    if config.lora_adapter:
        name += "+" + short(config.lora_adapter).replace("/", "__")
    return f"diffembed/{name}"


def default_revision(embedder: Embedder, settings: Mapping[str, Any] | None = None) -> str:
    """12 hex chars over the resolved config, the adapter's settings and the checkpoint's (and adapter's) files.

    mteb caches results per (name, revision); any change to pooling, instructions, max_length, weights... starts
    a fresh result folder instead of silently reusing old numbers (batching and device do not count).
    """
    digest = hashlib.sha256(embedder.config.model_dump_json(exclude=_NOT_IN_REVISION).encode())
    digest.update(json.dumps(settings or {}, sort_keys=True, default=str).encode())
    _fingerprint(Path(embedder.backbone.path), digest)
    if embedder.config.lora_adapter:
        _fingerprint(Path(embedder.config.lora_adapter).expanduser(), digest)
    return digest.hexdigest()[:12]


def _load_encoder(model_name: str, revision: str | None = None, *, config: Mapping[str, Any],
                  device: str | None = None, **kwargs: Any) -> MTEBEncoder:
    """ModelMeta loader: `meta.load_model()` / the mteb CLI rebuild the encoder from the recorded config."""
    data = dict(config)
    if device is not None:
        data["device"] = device
    return MTEBEncoder(EmbedderConfig.model_validate(data), name=model_name, revision=revision, **kwargs)


def model_meta(embedder: Embedder, *, name: str | None = None, revision: str | None = None,
               loader_kwargs: Mapping[str, Any] | None = None) -> ModelMeta:
    """mteb's ModelMeta for an Embedder: name/revision for the result folder, dimension, max tokens, cosine."""
    from mteb.models.model_meta import ModelMeta

    config = embedder.config
    return ModelMeta(
        loader=_load_encoder,
        # The recorded config rebuilds the model anywhere: batching and device are left to the loading machine.
        loader_kwargs={"config": config.model_dump(mode="json", exclude=_NOT_IN_REVISION), **(loader_kwargs or {})},
        name=name or default_name(config),
        revision=revision or default_revision(embedder, loader_kwargs),
        release_date=None,
        languages=None,
        n_parameters=sum(p.numel() for p in embedder.model.parameters()),
        memory_usage_mb=None,
        max_tokens=config.max_length,
        embed_dim=embedder.dimension,
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch", "Transformers"],
        similarity_fn_name="cosine",
        use_instructions=True,
        training_datasets=None,
        modalities=["text"],
    )


class MTEBEncoder:
    """An mteb 2.x encoder (`mteb.models.EncoderProtocol`) backed by a diffembed Embedder.

    Args:
        embedder: an Embedder, or an EmbedderConfig / checkpoint path to build one from (None: packaged MiniLM).
        instructions: query instruction per mteb task name or task type; overrides the config's default.
        use_task_prompts: fall back to the prompt in the task's mteb metadata before the config's default.
        name, revision: override the ModelMeta name (`org/model`) and revision (the result folder).
    """

    def __init__(
        self,
        embedder: Embedder | EmbedderConfig | str | None = None,
        *,
        instructions: Mapping[str, str | None] | None = None,
        use_task_prompts: bool = False,
        name: str | None = None,
        revision: str | None = None,
    ):
        self.embedder = _as_embedder(embedder)
        config = self.embedder.config
        if not config.documents.one_vector:
            per = "window" if config.documents.windows == "best" else "chunk"
            raise ConfigError(f"MTEB scores one vector per document; documents.windows: {config.documents.windows} "
                              f"stores one per {per} (use first or mean for MTEB)")
        if self.embedder.multivector:
            raise ConfigError(f"MTEB scores one vector per input by cosine; mask_vectors: multi gives "
                              f"{config.mask_tokens} per input, scored by MaxSim (use mask_vectors: mean for MTEB)")
        _require_mteb()
        self.instructions = dict(instructions or {})
        self.use_task_prompts = use_task_prompts
        # A plain attribute, not a property: mteb's ModelMeta.load_model assigns it.
        self.mteb_model_meta = model_meta(
            self.embedder, name=name, revision=revision,
            loader_kwargs={"instructions": self.instructions or None, "use_task_prompts": use_task_prompts},
        )

    # ------------------------------------------------------------ instructions

    def _mapped(self, task_metadata: Any) -> Any:
        for key in (task_metadata.name, task_metadata.type):
            if key in self.instructions:
                return self.instructions[key]
        return _MISSING

    def task_instruction(self, task_metadata: Any) -> str | None:
        """The instruction a task's queries get (before per-query instructions); None: the config's default."""
        mapped = self._mapped(task_metadata)
        if mapped is not _MISSING:
            return mapped or ""  # None or "" in the map: explicitly no instruction
        if self.use_task_prompts:
            prompt = task_metadata.prompt
            if isinstance(prompt, dict):
                prompt = prompt.get("query")
            if prompt:
                return prompt
        return None  # Embedder falls back to config.query_instruction

    # ------------------------------------------------------------ encoding

    def encode(
        self,
        inputs: Iterable[Mapping[str, Any]],
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """(N, D) float32 for every row of mteb's DataLoader, in order.

        mteb's `batch_size` only shapes its DataLoader: all rows are gathered and the Embedder batches them by
        its own padded-token budget.
        """
        kind = getattr(prompt_type, "value", prompt_type)
        texts: list[str] = []
        titles: list[str | None] = []
        row_instructions: list[str | None] = []
        for batch in inputs:
            if "text" not in batch:
                raise ValueError(f"{task_metadata.name}: only text inputs are supported, got {sorted(batch)}")
            # A query batch carries the bare query in `query` (its `text` has the instruction appended by mteb);
            # a corpus batch carries the document's `body` and `title` beside their joined `text`.
            if kind == "query" and "query" in batch:
                column = batch["query"]
            elif kind != "query" and "body" in batch:
                column = batch["body"]
            else:
                column = batch["text"]
            texts.extend(str(t) for t in column)
            given_titles = batch.get("title") if kind != "query" and "body" in batch else None
            titles.extend(t if isinstance(t, str) else None  # a blank one is none: document_fields, below
                          for t in (given_titles if given_titles is not None else [None] * len(column)))
            given = batch.get("instruction") if kind == "query" else None
            row_instructions.extend(given if given is not None else [None] * len(column))

        if kind == "query":
            return self._encode_queries(texts, row_instructions, self.task_instruction(task_metadata))
        if kind is None and self._mapped(task_metadata) is not _MISSING:  # symmetric task with an instruction
            return self._encode_queries(texts, [None] * len(texts), self.task_instruction(task_metadata))
        for i, (text, title) in enumerate(zip(texts, titles)):
            texts[i], titles[i] = document_fields(text, title)  # the batch job's and BEIR's rule
        return self._encode_nonempty(
            texts, lambda keep: self.embedder.encode_documents([texts[i] for i in keep], [titles[i] for i in keep])
        )

    def _encode_queries(self, texts: list[str], row_instructions: list[str | None], default: str | None) -> np.ndarray:
        """A query's own instruction (FollowIR-style tasks) wins over the task's."""
        per_row = [ins if ins and ins.strip() else default for ins in row_instructions]

        def encode(keep: list[int]) -> np.ndarray:
            return self.embedder.encode_queries([texts[i] for i in keep], instruction=[per_row[i] for i in keep])

        return self._encode_nonempty(texts, encode)

    def _encode_nonempty(self, texts: list[str], encode: Callable[[list[int]], np.ndarray]) -> np.ndarray:
        """Empty texts (some corpora have them) get a zero vector: they score 0 against everything."""
        out = np.zeros((len(texts), self.embedder.dimension), dtype=np.float32)
        keep = [i for i, t in enumerate(texts) if t.strip()]
        if keep:
            out[keep] = encode(keep)
        return out

    # ------------------------------------------------------------ similarity (the ModelMeta says cosine)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)

    def __repr__(self) -> str:
        meta = self.mteb_model_meta
        return f"MTEBEncoder({meta.name}@{meta.revision}, dim={self.embedder.dimension})"


def run_mteb(
    embedder_or_config: Embedder | EmbedderConfig | MTEBEncoder | str | None,
    tasks: Any,
    output_folder: str | Path,
    *,
    instructions: Mapping[str, str | None] | None = None,
    use_task_prompts: bool = False,
    overwrite_strategy: str = "only-missing",
    encode_kwargs: Mapping[str, Any] | None = None,
    prediction_folder: str | Path | None = None,
    raise_error: bool = True,
    show_progress_bar: bool = False,
) -> ModelResult:
    """Evaluate an Embedder on mteb tasks; results land in `output_folder/results/<name>/<revision>/<task>.json`.

    `tasks`: task names (`"SciFact"`, `"BrightRetrieval"`, `"LEMBNarrativeQARetrieval"`,
    `"Core17InstructionRetrieval"`), mteb task objects, an mteb Benchmark, or a mix of names and objects.
    Named tasks fetch their data from the Hugging Face Hub through mteb/datasets the first time (then the
    datasets cache; HF_DATASETS_OFFLINE=1 to forbid downloads). Returns mteb's `ModelResult`
    (`summarize(result)`: task name -> main score). An existing result for the same name/revision is reused
    (`overwrite_strategy="always"` to recompute).
    """
    mteb = _require_mteb()
    if isinstance(embedder_or_config, MTEBEncoder):
        if instructions is not None or use_task_prompts:
            raise ValueError("pass instructions/use_task_prompts to the MTEBEncoder itself")
        encoder = embedder_or_config
    else:
        encoder = MTEBEncoder(embedder_or_config, instructions=instructions, use_task_prompts=use_task_prompts)

    if isinstance(tasks, (str, mteb.AbsTask)):
        tasks = [tasks]
    if not isinstance(tasks, mteb.Benchmark):
        tasks = [mteb.get_task(t) if isinstance(t, str) else t for t in tasks]

    return mteb.evaluate(
        encoder,
        tasks,
        cache=mteb.ResultCache(Path(output_folder)),
        overwrite_strategy=overwrite_strategy,
        encode_kwargs=dict(encode_kwargs or {}),
        prediction_folder=prediction_folder,
        raise_error=raise_error,
        show_progress_bar=show_progress_bar,
        co2_tracker=False,
    )


def result_path(encoder: MTEBEncoder, output_folder: str | Path, task_name: str) -> Path:
    """Where `run_mteb` saved a task's result JSON."""
    meta = encoder.mteb_model_meta
    return Path(output_folder) / "results" / meta.model_name_as_path() / str(meta.revision) / f"{task_name}.json"


def summarize(result: ModelResult) -> dict[str, float]:
    """task name -> main score (mean over the task's splits and subsets)."""
    return {task_result.task_name: float(task_result.get_score()) for task_result in result.task_results}

