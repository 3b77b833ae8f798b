"""The methods that scripts/finetune_all.sh and dense_all.sh run, and the labels of their
tables, from ``mimar.names`` (a method added there is run with no edit to the scripts).

python3 scripts/methods.py           # one line per tiny recipe: NAME RECIPE TEACHER NECK
python3 scripts/methods.py --names   # the names only, on one line

NAME is the bench name (``mimar bench quality --methods``); TEACHER is 1 when the method
learns from a frozen teacher (the scripts give it the SimMIM run of the same OUT, as the bench
does), NECK 1 when it pretrains a feature-pyramid neck (dense transfer also runs it with the
neck re-initialised).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # mimar.names needs only the standard library: any python3

from mimar import names  # noqa: E402

TEACHER_RUN = "simmim"  # the run that teaches (as in mimar bench quality)


def label(name: str) -> str:
    """``SimMIM ViT``, ``EVA ViT (SimMIM-run teacher)``, ...: the method's title, its tiny
    recipe's backbone (the file name's first word), and its teacher."""
    entry = names.METHODS[names.method_of_bench_name(name)]
    backbone = names.tiny_recipes()[name].name.split("_")[0]
    text = f"{entry.title} {names.BACKBONES[backbone].title}"
    return f"{text} (SimMIM-run teacher)" if entry.teacher != "none" else text


def table() -> list[tuple[str, Path, bool, bool]]:
    """(name, recipe, needs a teacher, has a pyramid neck) of every tiny recipe, in order."""
    rows = []
    for name, recipe in names.tiny_recipes().items():
        entry = names.METHODS[names.method_of_bench_name(name)]
        rows.append((name, recipe, entry.teacher != "none", entry.pyramid_neck))
    return rows


def main(argv: list[str]) -> None:
    if argv == ["--names"]:
        print(" ".join(name for name, *_ in table()))
        return
    for name, recipe, teacher, neck in table():
        print(name, recipe.relative_to(ROOT), int(teacher), int(neck))


if __name__ == "__main__":
    main(sys.argv[1:])
