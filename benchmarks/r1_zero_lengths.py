"""GRPO against Dr. GRPO on one task: response lengths of correct and incorrect answers, accuracy, side by side.

Reads two runs of `recipes/r1_zero.py` (the same model, data and settings, `--algo grpo` and `--algo dr-grpo`) and
writes OUT.json (every curve, per iteration) and OUT.png (moving averages over `--window` iterations).

    python recipes/r1_zero.py --algo grpo ...; python recipes/r1_zero.py --algo dr-grpo ...
    python benchmarks/r1_zero_lengths.py --grpo RUN_DIR --dr-grpo RUN_DIR --out benchmarks/results/r1_zero_grpo_vs_drgrpo
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("r1/length_incorrect", "r1/length_correct", "r1/accuracy", "r1/clipped_fraction", "eval/greedy_accuracy")


def curves(run_dir: Path) -> dict[str, list[list[float]]]:
    """key -> [[iteration, value], ...] from RUN_DIR/metrics.jsonl (NaN values, e.g. no correct response, left out)."""
    out: dict[str, list[list[float]]] = {k: [] for k in KEYS}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        step = row.get("step", row.get("_step"))
        for key in KEYS:
            if isinstance(row.get(key), (int, float)) and row[key] == row[key]:  # null: NaN/inf, left out
                out[key].append([float(step), float(row[key])])
    return out


def moving_average(points: list[list[float]], window: int) -> tuple[list[float], list[float]]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1]) for i in range(len(ys))]
    return xs, smooth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grpo", type=Path, required=True)
    parser.add_argument("--dr-grpo", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output path without extension")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--note", default="", help="what the runs were (recorded in the JSON)")
    args = parser.parse_args()
    runs = {"grpo": curves(args.grpo), "dr-grpo": curves(args.dr_grpo)}
    summary = {}
    for name, c in runs.items():
        last = c["r1/length_incorrect"][-args.window:]
        first = c["r1/length_incorrect"][: args.window]
        summary[name] = {
            "length_incorrect_first_window": sum(v for _, v in first) / len(first),
            "length_incorrect_last_window": sum(v for _, v in last) / len(last),
            "greedy_accuracy": [v for _, v in c["eval/greedy_accuracy"]],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"note": args.note, "window": args.window, "summary": summary, "curves": runs}, indent=1) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, c in runs.items():
        for ax, key in zip(axes[:2], ("r1/length_incorrect", "r1/length_correct")):
            ax.plot(*moving_average(c[key], args.window), label=name)
        axes[2].plot(*zip(*c["eval/greedy_accuracy"]), marker="o", label=name)
    for ax, title in zip(axes, ("incorrect responses: mean length (tokens)", "correct responses: mean length (tokens)",
                                "held-out greedy accuracy")):
        ax.set_title(title)
        ax.set_xlabel("policy iteration")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=100)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
