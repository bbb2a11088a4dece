"""Tables of evaluation results in the layout of the paper's tables (markdown and JSON).

A *result* is the dict `evaluate.evaluate` returns:
`{"model": str, "templates": str, "zero_shot": {dataset: {"top1", "top5", "n", "num_classes"}},
  "zero_shot_mean": {"top1", "top5"} | None,
  "retrieval": {dataset: {"i2t": {"R@1", "R@5", "R@10"}, "t2i": {...}, "n_images", "n_captions"}},
  "features": {dataset: {"modality_gap", "modality_gap_mse", "alignment", "uniformity_image",
                         "uniformity_text"}}}`.
Accuracies and recalls are percentages. `table_rows` flattens results into the paper's columns:
zero-shot top-1 per dataset, their average, retrieval R@1 text->image and image->text, and the gap.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

Result = Mapping[str, Any]

# Short column names for the datasets of the paper's 12-dataset table.
SHORT_NAMES = {
    "imagenet2012": "ImageNet", "cifar10": "C10", "cifar100": "C100", "food101": "Food",
    "oxford_flowers102": "Flowers", "oxford_iiit_pet": "Pets", "caltech101": "Caltech",
    "dtd": "DTD", "eurosat": "EuroSAT", "sun397": "SUN", "stanford_cars": "Cars",
    "fgvc_aircraft": "Aircraft", "coco_karpathy_test": "COCO",
}

def short_name(dataset: str) -> str:
    """A column label for a dataset name ("folder:/x/cifar10" -> "cifar10", "folder:/x/cifar10/test" ->
    "cifar10/test", catalog names abbreviated)."""
    if dataset.startswith("folder:"):
        path = Path(dataset.split(":", 1)[1].rstrip("/"))
        if path.name in ("train", "test", "val", "validation") and path.parent.name:
            return f"{path.parent.name}/{path.name}"  # "folder:/x/cifar10/test" -> "cifar10/test"
        return path.name or dataset
    if dataset.startswith("coco_json:"):
        return Path(dataset.split(":")[1]).stem
    return SHORT_NAMES.get(dataset, dataset)


def table_rows(result: Result) -> dict[str, float | None]:
    """One row of the paper-style table: `{column: value}` in column order (None where not evaluated)."""
    row: dict[str, float | None] = {}
    for name, zs in result.get("zero_shot", {}).items():
        row[f"{short_name(name)} top-1"] = zs["top1"]
    if result.get("zero_shot"):
        row["ZS avg"] = result["zero_shot_mean"]["top1"]
    for name, rt in result.get("retrieval", {}).items():
        row[f"{short_name(name)} T->I R@1"] = rt["t2i"]["R@1"]
        row[f"{short_name(name)} I->T R@1"] = rt["i2t"]["R@1"]
    features = result.get("features", {})
    if features:
        # The gap of the first retrieval set if there is one (the paper's COCO gap), else of the first set.
        key = next(iter(result.get("retrieval", {})), None) or next(iter(features))
        row["gap"] = features[key]["modality_gap"]
        row["gap_mse"] = features[key]["modality_gap_mse"]
    return row


def comparison(results: Sequence[Result]) -> dict[str, Any]:
    """`{"columns": [...], "models": [{"model", "values": {col: v}, "diff": {col: v - first}}]}`.

    Columns are the union over results in first-seen order; differences are against `results[0]`.
    """
    if not results:
        raise ValueError("comparison needs at least one result, got none")
    rows = [table_rows(r) for r in results]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    base = rows[0]
    models = []
    for result, row in zip(results, rows):
        values = {c: row.get(c) for c in columns}
        diff = {c: (None if values[c] is None or base.get(c) is None else values[c] - base[c]) for c in columns}
        models.append({"model": result["model"], "values": values, "diff": diff})
    return {"columns": columns, "baseline": results[0]["model"], "models": models}


def _cell(value: float | None, diff: float | None, column: str, show_diff: bool) -> str:
    if value is None:
        return "-"
    digits = 4 if column.startswith("gap") else 2
    text = f"{value:.{digits}f}"
    if show_diff and diff is not None:
        text += f" ({diff:+.{digits}f})"
    return text


def markdown_table(results: Sequence[Result]) -> str:
    """The comparison as a markdown table; rows after the first show `value (difference vs first)`."""
    table = comparison(results)
    columns = table["columns"]
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for i, m in enumerate(table["models"]):
        cells = [_cell(m["values"][c], m["diff"][c], c, show_diff=i > 0) for c in columns]
        lines.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def details_markdown(result: Result) -> str:
    """All numbers of one result: zero-shot top-1/top-5, retrieval R@1/5/10 both ways, feature metrics."""
    out = [f"### {result['model']}", ""]
    if result.get("zero_shot"):
        out += ["| Zero-shot | n | classes | top-1 | top-5 |", "|---|---:|---:|---:|---:|"]
        for name, zs in result["zero_shot"].items():
            out.append(f"| {name} | {zs['n']} | {zs['num_classes']} | {zs['top1']:.2f} | {zs['top5']:.2f} |")
        mean = result["zero_shot_mean"]
        out += [f"| mean | | | {mean['top1']:.2f} | {mean['top5']:.2f} |", ""]
    if result.get("retrieval"):
        out += ["| Retrieval | images | captions | I->T R@1 | R@5 | R@10 | T->I R@1 | R@5 | R@10 |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, rt in result["retrieval"].items():
            i2t = " | ".join(f"{rt['i2t'][k]:.2f}" for k in ("R@1", "R@5", "R@10"))
            t2i = " | ".join(f"{rt['t2i'][k]:.2f}" for k in ("R@1", "R@5", "R@10"))
            out.append(f"| {name} | {rt['n_images']} | {rt['n_captions']} | {i2t} | {t2i} |")
        out.append("")
    if result.get("features"):
        keys = ("modality_gap", "modality_gap_mse", "alignment", "uniformity_image", "uniformity_text")
        out += ["| Features | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for name, f in result["features"].items():
            out.append(f"| {name} | " + " | ".join(f"{f[k]:.4f}" for k in keys) + " |")
        out.append("")
    return "\n".join(out)


def write_report(results: Sequence[Result], out_dir: str | Path, *, pictures: Sequence[str | Path] = (),
                 title: str = "Evaluation") -> dict[str, Path]:
    """Write `report.md` (comparison table, details, pictures) and `report.json` into `out_dir`.

    Returns `{"markdown": path, "json": path}`. Picture paths are linked relative to `out_dir`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", markdown_table(results)]
    if len(results) > 1:
        md.append(f"Differences in parentheses are against `{results[0]['model']}`. "
                  "Accuracies and recalls in %; gap: centroid distance of the normalized embeddings "
                  "(lower is closer).\n")
    md += ["## Details", ""] + [details_markdown(r) for r in results]
    if pictures:
        md += ["## Pictures", ""]
        for p in pictures:
            p = Path(p)
            rel = p.relative_to(out) if p.is_relative_to(out) else p
            md += [f"![{p.stem}]({rel.as_posix()})", ""]
    paths = {"markdown": out / "report.md", "json": out / "report.json"}
    paths["markdown"].write_text("\n".join(md))
    payload = {"comparison": comparison(results), "results": list(results),
               "pictures": [str(Path(p).name) for p in pictures]}
    paths["json"].write_text(json.dumps(payload, indent=2, default=float))
    return paths
