"""The dense-transfer table of docs/results.md from the run folders of scripts/dense_all.sh.

Usage: python3 scripts/dense_table.py runs/finetune-all
Reads each method's RUN_DIR/eval/{segment,detect}[-scratch|-scratch-neck]/ metrics, so that
the iTPN neck ablation (a separate call) appears beside its pretrained and scratch rows.
"""

import json
import sys
from pathlib import Path

from finetune_table import METHODS as NAMES  # the same method labels as the fine-tune table

KEYS = {"segment": "test_miou", "detect": "test_ap"}
VARIANTS = (("", "pretrained"), ("-scratch-neck", "scratch neck"), ("-scratch", "scratch"))


def last_score(folder: Path, key: str):
    """(last test score, wall minutes from config.yaml to the final checkpoint: training and
    the test pass) of a finished dense run folder, else None."""
    metrics, ckpt = folder / "metrics.jsonl", folder / "checkpoints" / "last.pt"
    if not metrics.is_file() or not ckpt.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    tested = [r for r in rows if key in r]
    if not tested:
        return None
    minutes = (ckpt.stat().st_mtime - (folder / "config.yaml").stat().st_mtime) / 60
    return tested[-1][key], minutes


def main(out: str) -> None:
    print("| method | task | pretrained | scratch neck | scratch | minutes: pretrained / scratch |")
    print("|---|---|---|---|---|---|")
    for name, label in NAMES.items():
        for task, key in KEYS.items():
            cells, minutes = [], []
            for suffix, _ in VARIANTS:
                got = last_score(Path(out) / name / "eval" / f"{task}{suffix}", key)
                cells.append("" if got is None else f"{got[0]:.2f}")
                if got is not None and suffix != "-scratch-neck":
                    minutes.append(f"{got[1]:.1f}")
            if any(cells):
                metric = "mIoU" if task == "segment" else "box AP"
                best = max((c for c in cells if c), key=float)
                cells = [f"**{c}**" if c == best else c for c in cells]
                row = f"| {label} | {task} ({metric}) | {' | '.join(cells)} |"
                print(f"{row} {' / '.join(minutes)} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/finetune-all")
