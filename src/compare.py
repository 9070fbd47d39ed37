"""Gathers every completed run in out/ into one comparison table.

Reads `out/<script>/<run>/metrics.json` of every complete run (folders being written or
interrupted, `.<name>.partial`, are left out), prints a markdown table, and writes it to
`out/comparison.md` and `out/comparison.csv`, best test accuracy first.

    python src/compare.py
    python src/compare.py --out /path/to/runs
"""

import argparse
import csv
import json
import sys
from pathlib import Path

from vgg_transfer import paths

COLUMNS = (
    ("script", "script"),
    ("run", "run"),
    ("api", "API"),
    ("strategy", "strategy"),
    ("image_size", "image size"),
    ("epochs_run", "epochs"),
    ("lr_schedule", "LR schedule"),
    ("trainable_parameters", "trainable params"),
    ("total_parameters", "total params"),
    ("test_accuracy", "test accuracy"),
    ("macro_f1", "macro-F1"),
    ("wall_seconds", "wall time (s)"),
    ("subset", "subset"),
    ("device", "device"),
)


def collect(out_dir):
    """One dict per complete run under `out_dir`, with the COLUMNS keys."""
    rows = []
    for metrics_file in sorted(Path(out_dir).glob("*/*/metrics.json")):
        if metrics_file.parent.name.startswith("."):
            continue
        try:
            metrics = json.loads(metrics_file.read_text())
        except (OSError, ValueError):
            print(f"Skipping unreadable {metrics_file}", file=sys.stderr)
            continue
        model = metrics.get("model", {})
        rows.append({
            "script": metrics.get("script", metrics_file.parent.parent.name),
            "run": metrics_file.parent.name,
            "api": metrics.get("api", ""),
            "strategy": metrics.get("strategy", ""),
            "image_size": metrics.get("hyperparameters", {}).get("IMAGE_SIZE", ""),
            "epochs_run": metrics.get("epochs_run", ""),
            # Runs from before LR_SCHEDULE existed all reduced the rate on plateaus.
            "lr_schedule": metrics.get("hyperparameters", {}).get("LR_SCHEDULE", "plateau"),
            "trainable_parameters": model.get("trainable_parameters", ""),
            "total_parameters": model.get("total_parameters", ""),
            "test_accuracy": metrics.get("test_accuracy"),
            "macro_f1": metrics.get("macro_f1"),
            "wall_seconds": metrics.get("seconds", {}).get("total", ""),
            "subset": metrics.get("subset") or "all",
            "device": metrics.get("environment", {}).get("device", ""),
        })
    rows.sort(key=lambda row: -(row["test_accuracy"] or 0))
    return rows


def markdown(rows):
    def cell(key, value):
        if key in ("test_accuracy", "macro_f1") and isinstance(value, float):
            return f"{value:.4f}"
        if key.endswith("parameters") and isinstance(value, int):
            return f"{value:,}"
        return str(value)

    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(key, row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", metavar="DIR", default=str(paths.out_dir()), help="the folder of the runs (default: out/)")
    options = parser.parse_args(argv)
    out_dir = Path(options.out)
    if not out_dir.is_dir():
        print(f"compare.py: error: {out_dir} is not a folder; pass --out DIR with the runs", file=sys.stderr)
        return 2
    rows = collect(out_dir)
    if not rows:
        print(f"compare.py: error: no completed runs under {out_dir}; run a script first, "
              f"e.g. python src/transfer_learning.py", file=sys.stderr)
        return 2
    table = markdown(rows)
    print(table, end="")
    (out_dir / "comparison.md").write_text(table)
    with open(out_dir / "comparison.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[key for key, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nWritten: {out_dir / 'comparison.md'}, {out_dir / 'comparison.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
