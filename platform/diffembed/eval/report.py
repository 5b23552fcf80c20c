"""Evaluation results as files: results.json (everything) and results.md (a Markdown table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

COLUMNS = (("ndcg@1", "nDCG@1"), ("ndcg@10", "nDCG@10"), ("recall@10", "Recall@10"), ("recall@100", "Recall@100"),
           ("mrr@10", "MRR@10"))


def _fmt(value: float) -> str:
    return f"{100 * value:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
    """One row per task entry, metrics in percent; each row's primary metric in bold."""
    lines = [
        "| task | " + " | ".join(label for _, label in COLUMNS) + " | queries | documents |",
        "|---|" + "---:|" * (len(COLUMNS) + 2),
    ]
    for task, entry in results["tasks"].items():
        main = results.get("primary", {}).get(task, (None, None))[0]
        cells = [f"**{_fmt(entry[key])}**" if key == main else _fmt(entry[key]) for key, _ in COLUMNS]
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {entry['queries']} | {entry['documents']} |")
    return "\n".join(lines)


def fusion_label(setting: dict[str, Any]) -> str:
    if setting.get("fusion") == "weighted":
        return f"weighted (dense_weight {setting['dense_weight']:g})"
    return str(setting.get("fusion"))


def tuning_table(results: dict[str, Any]) -> str:
    """`--tune-fusion`'s grid per task: each fusion's dev nDCG@10, the chosen one in bold."""
    lines = []
    for task, tuned in results.get("fusion_tuning", {}).items():
        chosen = fusion_label(tuned["chosen"])
        lines += [f"Fusion tuned on `{task}` split {tuned['split']} ({tuned['queries']} queries): **{chosen}**, "
                  "stored with the collection.", "", "| fusion | dev nDCG@10 |", "|---|---:|"]
        for row in tuned["grid"]:
            label = fusion_label(row)
            cell = _fmt(row["ndcg@10"])
            lines.append(f"| {label} | {f'**{cell}**' if label == chosen else cell} |")
        lines.append("")
    return "\n".join(lines)


def markdown_report(results: dict[str, Any]) -> str:
    r = results.get("retrieval", {})
    setup = f"model `{results['model']}`"
    if r:
        setup += (f" · backend {r['backend']} · mode {r['mode']} · documents {r['documents']['windows']} window(s)"
                  f" (max_length {r['max_length']})")
        fusions = sorted({fusion_label(f) for f in r.get("fusion", {}).values()})
        if fusions:
            setup += f" · fusion {', '.join(fusions)}"
    tuning = tuning_table(results)
    return (
        f"# Evaluation: {results['name']}\n\n{setup}\n\n"
        "Scores in percent; **bold** is the task's primary metric (nDCG@10 for retrieval datasets, "
        "nDCG@1 for passkey and needle).\n\n" + markdown_table(results) + "\n" + (f"\n{tuning}" if tuning else "")
    )


def comparison_table(runs: Sequence[dict[str, Any]], labels: Sequence[str] | None = None) -> str:
    """Primary metric per task (rows) for several runs (columns, labelled by run name unless given)."""
    labels = list(labels) if labels is not None else [r["name"] for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"got {len(labels)} labels for {len(runs)} runs")
    tasks: list[str] = []
    for r in runs:
        tasks += [t for t in r["primary"] if t not in tasks]
    lines = ["| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(runs)]
    for task in tasks:
        metric = next(r["primary"][task][0] for r in runs if task in r["primary"])
        cells = [_fmt(r["primary"][task][1]) if task in r["primary"] else "–" for r in runs]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    """(results.json, results.md) under `output_dir`."""
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown_report(results))
    return json_path, md_path


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json (or the folder holding one) back as the dict run_evaluation returned."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "results.json"
    results = json.loads(path.read_text())
    results["primary"] = {task: tuple(value) for task, value in results.get("primary", {}).items()}
    return results
