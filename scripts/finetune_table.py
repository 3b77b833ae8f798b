"""The per-method fine-tuning table of docs/results.md from the runs of scripts/finetune_all.sh.

python3 scripts/finetune_table.py runs/finetune-all
"""

import json
import sys
from pathlib import Path

import methods  # scripts/methods.py: the list from mimar/names.py

# run folder -> row label, in the scripts' order
METHODS = {name: methods.label(name) for name, *_ in methods.table()}


def pair(a: float, b: float, a_note: str = "", b_note: str = "") -> str:
    """``a / b`` with the higher one in bold."""
    left, right = f"{a:.2f}{a_note}", f"{b:.2f}{b_note}"
    return f"**{left}** / {right}" if a >= b else f"{left} / **{right}**"


def rows(path: Path) -> dict:
    return {r["model"]: r for r in json.loads(path.read_text())["rows"]}


def main(out: Path) -> None:
    print(
        "| method | pretrain min | fine-tune top-1: pretrained / scratch "
        "| mean corruption top-1 (clean): pretrained / scratch "
        "| fine-tune min: pretrained / scratch |"
    )
    print("|---|---|---|---|---|")
    for name, label in METHODS.items():
        run = out / name
        if not (run / "eval" / "finetune.json").is_file():
            print(f"| {label} | not run yet | | | |")
            continue
        minutes = (run / "checkpoints" / "last.pt").stat().st_mtime
        minutes = (minutes - (run / "config.yaml").stat().st_mtime) / 60
        ft = rows(run / "eval" / "finetune.json")
        p, s = ft["pretrained"], ft["random init"]
        robust = "not run yet"
        if (run / "eval" / "robustness.json").is_file():
            rob = rows(run / "eval" / "robustness.json")
            rp, rs = rob["pretrained"], rob["random init"]
            clean = [f" ({r['details']['clean_top1']:.1f})" for r in (rp, rs)]
            robust = pair(rp["top1"], rs["top1"], *clean)
        print(
            f"| {label} | {minutes:.1f} | {pair(p['top1'], s['top1'])} | {robust} "
            f"| {p['details']['seconds'] / 60:.1f} / {s['details']['seconds'] / 60:.1f} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/finetune-all"))
