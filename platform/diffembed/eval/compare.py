"""The paper's study as one job: fine-tune several backbones with one recipe, evaluate them on the same tasks.

Each backbone (say Dream bidirectional, Qwen2.5 causal with last-token pooling, Qwen2.5 with the causal mask
switched off) goes through the training job with the same data and hyper-parameters, its export through the
evaluation job with the same tasks; the outcome is one table (Markdown + CSV) and one plot (PNG) of the
primary score per task and backbone. Finished backbones are skipped on a rerun, so a failure in the third
backbone does not retrain the first two.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Self

from pydantic import Field, field_validator, model_validator

from diffembed.config import ConfigError, ConfigModel, apply_overrides, read_yaml_mapping, repeated
from diffembed.eval.config import EvalConfig
from diffembed.train.config import TrainConfig

DONE = ".done"  # written after results.json: a backbone with it is finished


class Backbone(ConfigModel):
    """One row of the study: how its embedder differs from the template's, and its own training overrides."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Row label; also the run's folder name.")
    embedder: dict[str, Any] = Field(
        description="EmbedderConfig fields laid over the training template's embedder (model, attention, pooling…)."
    )
    train: list[str] = Field(default_factory=list, description="Dotted key=value overrides of the training config.")

    @field_validator("embedder")
    @classmethod
    def _has_model(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "model" not in value:
            raise ValueError("each backbone's embedder must name a model")
        return value


class CompareConfig(ConfigModel):
    name: str = "compare"
    backbones: list[Backbone] = Field(min_length=1)
    train: TrainConfig = Field(description="The shared recipe (inline, or a path to a training YAML).")
    evaluation: EvalConfig = Field(description="The shared tasks (inline, or a path to an evaluation YAML).")
    output_dir: str = "runs/compare"
    fine_tune: bool = Field(True, description="False: evaluate the base checkpoints only (a zero-shot study).")
    rerun: bool = Field(False, description="Redo backbones that already have results.")

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> Self:
        # `train:` / `evaluation:` may name a YAML file of that job's own config; it is read before the
        # overrides apply, so `train.optim.max_steps=4` reaches into a referenced file's values too.
        sections = ("train", "evaluation")
        overrides = list(overrides or [])
        data = apply_overrides(dict(data), [o for o in overrides if o.partition("=")[0] in sections])
        for key in sections:
            if isinstance(data.get(key), str):
                try:
                    data[key] = read_yaml_mapping(data[key])
                except ConfigError as exc:
                    raise ConfigError(f"{source}: {key}: {exc}") from None
        return super().from_dict(data, [o for o in overrides if o.partition("=")[0] not in sections], source)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        dupes = repeated([b.name for b in self.backbones])
        if dupes:
            raise ValueError(f"backbone names must be unique, repeated: {dupes}")
        return self

    def train_config(self, backbone: Backbone) -> TrainConfig:
        """The template recipe with this backbone's embedder and overrides, in its own run folder."""
        data = self.train.model_dump(mode="json", exclude_unset=True)
        data["embedder"] = {**data.get("embedder", {}), **backbone.embedder}
        data.setdefault("run", {})
        data["run"] = {**data["run"], "name": backbone.name, "storage_path": str(Path(self.output_dir) / "runs")}
        return TrainConfig.from_dict(apply_overrides(data, backbone.train, TrainConfig), source=f"backbone {backbone.name}")

    def eval_config(self, backbone: Backbone, model: str) -> EvalConfig:
        """The shared tasks, run on `model`; fields the evaluation template sets explicitly (max_length, dtype,
        long-input handling) win, everything else comes from the export's saved embedder settings."""
        data = self.evaluation.model_dump(mode="json", exclude_unset=True)
        embedder = dict(data.get("embedder", {}))
        if model == backbone.embedder["model"]:  # a base checkpoint: it has no saved settings, use the backbone's
            embedder = {**self.train.embedder.model_dump(mode="json", exclude_unset=True), **backbone.embedder,
                        **embedder}
        embedder["model"] = model
        data["embedder"] = embedder
        data["name"] = backbone.name
        data["output_dir"] = str(Path(self.output_dir) / backbone.name)
        return EvalConfig.from_dict(data, source=f"evaluation of {backbone.name}")


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Train (unless `fine_tune` is off) and evaluate every backbone; write the table and the plot."""
    from diffembed.eval.report import load_results, write_results
    from diffembed.eval.runner import run_evaluation

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for backbone in cfg.backbones:  # fail on a bad backbone before hours of training go into the others
        cfg.train_config(backbone)
    runs: dict[str, dict[str, Any]] = {}
    for backbone in cfg.backbones:
        done = out / backbone.name / DONE
        if done.is_file() and not cfg.rerun:
            runs[backbone.name] = load_results(out / backbone.name)
            continue
        model = backbone.embedder["model"]
        training: dict[str, Any] = {}
        if cfg.fine_tune:
            from diffembed.train.loop import train

            training = train(cfg.train_config(backbone))
            model = training["export_dir"]
        results = run_evaluation(cfg.eval_config(backbone, model))
        results["training"] = {k: v for k, v in training.items() if isinstance(v, (int, float, str))}
        write_results(results, out / backbone.name)
        done.touch()  # last: marks the backbone finished
        runs[backbone.name] = results
    table = score_table(runs)
    md, csv_path = write_table(runs, table, out, title=cfg.name)
    plot = plot_table(table, out / "compare.png", title=cfg.name)
    return {"name": cfg.name, "table": table, "markdown": str(md), "csv": str(csv_path), "plot": str(plot)}


def score_table(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """task -> backbone -> primary score, tasks in first-seen order (a synthetic task's average, then lengths)."""
    table: dict[str, dict[str, float]] = {}
    for backbone, results in runs.items():
        for task, (_, value) in results["primary"].items():
            table.setdefault(task, {})[backbone] = float(value)
    return table


def write_table(runs: dict[str, dict[str, Any]], table: dict[str, dict[str, float]], out: Path, title: str
                ) -> tuple[Path, Path]:
    """compare.md (scores in percent, one row per task) and compare.csv (the same as fractions)."""
    from diffembed.eval.report import comparison_table

    labels = list(runs)
    md_path, csv_path = out / "compare.md", out / "compare.csv"
    md_path.write_text(f"# {title}\n\n" + comparison_table(list(runs.values()), labels) + "\n")
    metrics = {task: metric for r in runs.values() for task, (metric, _) in r["primary"].items()}
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["task", "metric", *labels])
        for task, cells in table.items():
            writer.writerow([task, metrics[task], *(cells.get(b, "") for b in labels)])
    return md_path, csv_path


def plot_table(table: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """Grouped bars: one group per task (and synthetic length), one bar per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(table)
    backbones = list(dict.fromkeys(b for cells in table.values() for b in cells))
    width = 0.8 / max(len(backbones), 1)
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(tasks) + 2), 4.5))
    for i, backbone in enumerate(backbones):
        values = [table[t].get(backbone, np.nan) for t in tasks]
        ax.bar(x + (i - (len(backbones) - 1) / 2) * width, values, width, label=backbone)
    ax.set_xticks(x, tasks, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("primary score (nDCG@10; nDCG@1 for passkey/needle)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
