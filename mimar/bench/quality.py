"""``mimar bench quality``: every method pretrained under one budget and evaluated alike.

The bench, in order (files under ``OUT``):

1. **calibrate** (``calibration/<method>/``, ``calibration.json``): a short timed run of each
   method (seed 0, not counted) measures its seconds per optimizer step;
2. **plan** (:func:`plan_steps`): the budget (wall-clock minutes, or training images) becomes
   ``train.steps`` per method, so each warm-up + cosine schedule is planned for the steps that
   fit in it. Every method sees the same data, the same crop augmentation (``--crop-scale``),
   the same seeds, protocols and splits;
3. **pretrain** every method x seed into ``runs/<method>-seed<k>/`` (seeds are ``train.seed``).
   Within a seed SimMIM runs first: EVA, D-iGPT and iTPN-CLIP take the SimMIM run of their own
   seed as a frozen ``kind: mimar`` teacher (or ``--teacher RUN``);
4. **evaluate** every run with the requested protocols and their baselines (random init, raw
   pixels) through :func:`mimar.evaluation.evaluate`, which writes ``RUN/eval/<protocol>.json``:
   the only source of the bench's numbers;
5. **report** (:mod:`mimar.bench.report`): ``report.md``, ``report.json`` and three plots.

Resume (``--resume``): ``bench.json`` holds the settings, ``calibration.json`` the measured
step times; a run whose last checkpoint and last metrics row reached its planned steps is
kept (its picture is not looked at), an unfinished one continues from its newest checkpoint
(``last.pt``, or ``last.dcp/`` under ``train.strategy=fsdp``), one that died before its first
checkpoint starts again; an eval whose JSON exists is kept. Only the report is always
rewritten. The methods and their tiny recipes come from ``mimar.names`` (:func:`recipes`).

Why one file of ~600 lines: it is one command's whole control flow (settings, planner, cells,
calibration, the run loop and its progress display), read top to bottom; the numbers, tables
and plots live in :mod:`mimar.bench.report`.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import get_args

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mimar import names, runs, writes
from mimar.bench.report import step_seconds, write_report
from mimar.config import PretrainConfig, load_config, to_dict
from mimar.data.config import DatasetName
from mimar.errors import ConfigError
from mimar.protocols import PROTOCOLS

log = logging.getLogger("mimar")


def recipes() -> dict[str, Path]:
    """Bench name -> the method's tiny Fashion-MNIST recipe, from ``mimar.names`` (read at
    call time: a method added to the name table is benched with no edit here)."""
    return names.tiny_recipes()


TEACHER_METHOD = "simmim"  # whose run of the same seed teaches EVA, D-iGPT and iTPN-CLIP
SHORT_DATA_NAMES = {"fashion_mnist": "fmnist"}  # the default --out: runs/bench-fmnist
BENCH_FILE, CALIBRATION_FILE, TIMINGS_FILE = "bench.json", "calibration.json", "timings.json"


@dataclass(frozen=True, kw_only=True)
class QualityConfig:
    """The settings of one bench (stored in ``OUT/bench.json``; a resumed bench reuses them).

    ``overrides`` are dotted ``key=value`` words applied to every method's recipe, or to one
    method's only when written ``METHOD:key=value``.
    """

    methods: tuple[str, ...] = field(default_factory=lambda: tuple(recipes()))
    budget_minutes: float | None = None  # one of the two budgets; neither given: 5 minutes
    budget_images: int | None = None
    protocols: tuple[str, ...] = ("knn", "linear")
    seeds: int = 1
    data: str = "fashion_mnist"
    data_root: str | None = None  # None: the recipes' root (the Fashion-MNIST idx files)
    teacher: str | None = None  # a mimar run that teaches instead of the bench's SimMIM runs
    overrides: tuple[str, ...] = ()
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale of every method
    max_train: int = 0  # evaluation: first N train images (0 = all)
    max_test: int = 0
    calibration_steps: int = 10

    def __post_init__(self) -> None:
        for name in ("methods", "protocols", "overrides", "crop_scale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.budget_minutes is None and self.budget_images is None:
            object.__setattr__(self, "budget_minutes", 5.0)
        _check_names("method", self.methods, tuple(recipes()))
        _check_names("protocol", self.protocols, PROTOCOLS)
        if self.data not in get_args(DatasetName):
            choices = ", ".join(get_args(DatasetName))
            raise ConfigError(f"--data: unknown data {self.data!r}; choose one of {choices}")
        if self.data == "image_folder" and not self.data_root:
            raise ConfigError("--data image_folder needs --data-root FOLDER")
        if (self.budget_minutes is None) == (self.budget_images is None):
            raise ConfigError("give one budget: --budget-minutes or --budget-images, not both")
        if (self.budget_minutes or 1) <= 0 or (self.budget_images or 1) < 1:
            raise ConfigError("the budget must be positive")
        limits = (("seeds", 1), ("calibration_steps", 2), ("max_train", 0), ("max_test", 0))
        for name, low in limits:
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}")
        lo, hi = self.crop_scale if len(self.crop_scale) == 2 else (0, 0)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(
                f"--crop-scale must be LO,HI with 0 < LO <= HI <= 1, got {self.crop_scale}"
            )
        for word in self.overrides:
            if "=" not in word:
                raise ConfigError(f"--set {word!r} is not of the form [METHOD:]dotted.key=value")

    @property
    def budget_seconds(self) -> float | None:
        return None if self.budget_minutes is None else 60.0 * self.budget_minutes


def _check_names(kind: str, given: tuple[str, ...], valid: tuple[str, ...]) -> None:
    unknown = [name for name in given if name not in valid]
    if unknown or not given or len(set(given)) < len(given):
        what = f"unknown {kind}(s) {', '.join(unknown)}" if unknown else f"{kind}s must be distinct"
        raise ConfigError(
            f"{what if given else f'no {kind}s given'}; choose from {', '.join(valid)}"
        )


def default_out(data: str) -> Path:
    """``runs/bench-<data>`` (``runs/bench-fmnist`` for Fashion-MNIST)."""
    return Path("runs") / f"bench-{SHORT_DATA_NAMES.get(data, data)}"


# --- the budget planner ------------------------------------------------------------------------


def plan_steps(
    *,
    seconds_per_step: float,
    images_per_step: int,
    budget_seconds: float | None = None,
    budget_images: int | None = None,
) -> int:
    """Optimizer steps that fit in one budget (at least 1).

    Args:
        seconds_per_step: the method's measured wall time per optimizer step.
        images_per_step: training images per step (``data.batch_size * train.accum_steps``).
        budget_seconds: wall-clock budget: ``floor(budget / seconds_per_step)`` steps, so every
            method trains for (at most one step less than) the same time.
        budget_images: image budget: ``floor(budget / images_per_step)`` steps, so every method
            sees the same number of images (within one batch).
    """
    if (budget_seconds is None) == (budget_images is None):
        raise ValueError("give exactly one of budget_seconds and budget_images")
    if seconds_per_step <= 0 or images_per_step < 1:
        raise ValueError("seconds_per_step must be > 0 and images_per_step >= 1")
    if budget_images is not None:
        return max(1, budget_images // images_per_step)
    return max(1, math.floor(budget_seconds / seconds_per_step))


# --- runs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One pretraining run of the bench: a method at a seed, with its exact recipe overrides."""

    method: str
    seed: int
    run_dir: Path
    overrides: tuple[str, ...]
    steps: int
    evaluated: bool = True  # False: a SimMIM run that only teaches (simmim not in --methods)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def recipe(self) -> Path:
        return recipes()[self.method]

    def config(self) -> PretrainConfig:
        """The run's config (the bench draws its own progress display, not the engine's)."""
        return load_config(self.recipe, [*self.overrides, "train.progress=false"])

    def commands(self, settings: QualityConfig) -> list[str]:
        """The two commands that redo this cell by hand."""
        pre = ["mimar", "pretrain", _shown(self.recipe), *self.overrides]
        ev = [
            "mimar",
            "eval",
            *settings.protocols,
            "--checkpoint",
            str(self.run_dir),
            "--baselines",
        ]
        for flag, value in (("--max-train", settings.max_train), ("--max-test", settings.max_test)):
            ev += [flag, str(value)] if value else []
        return [shlex.join([*pre, "--run-dir", str(self.run_dir)]), shlex.join(ev)]


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def method_overrides(settings: QualityConfig, method: str) -> list[str]:
    """What every run of ``method`` changes in its recipe: the bench's data and augmentation,
    then the user's ``--set`` words (global ones, then ``METHOD:`` ones)."""
    words = [f"data.name={settings.data}"]
    words += [f"data.root={settings.data_root}"] if settings.data_root else []
    words += ["data.scale=[{},{}]".format(*settings.crop_scale)]
    mine = [w.partition(":")[2] for w in settings.overrides if w.partition(":")[0] == method]
    shared = [w for w in settings.overrides if ":" not in w.split("=")[0]]
    return words + shared + mine


def needs_teacher(settings: QualityConfig, method: str) -> bool:
    """Whether ``method``'s recipe asks for a mimar teacher the bench must supply."""
    cfg = load_config(recipes()[method], method_overrides(settings, method))
    entry = names.entry("method", cfg.method.name)
    return entry.teacher != "none" and cfg.teacher.kind == "mimar" and not cfg.teacher.path


def teacher_words(path: Path | str) -> list[str]:
    return ["teacher.kind=mimar", f"teacher.path={path}"]


def run_state(run_dir: Path, steps: int) -> str:
    """``finished`` (last checkpoint at ``steps`` and the metrics row of that step),
    ``unfinished`` (a checkpoint to continue), or ``missing`` (nothing to continue).

    The picture is not part of it: a run killed after its last checkpoint but before drawing
    is finished (its report shows "no picture"), and a method without a picture can finish.
    """
    from mimar.engine import checkpoint

    ckpt = runs.newest_checkpoint(run_dir)  # last.pt, or last.dcp/ under train.strategy=fsdp
    if ckpt is None:
        return "missing"
    try:
        step = checkpoint.load(ckpt)["step"]
    except Exception:  # a damaged file: start again
        return "missing"
    done = step >= steps and last_logged_step(run_dir) >= steps
    return "finished" if done else "unfinished"


def last_logged_step(run_dir: Path) -> int:
    """The ``step`` of the last complete row of ``RUN/metrics.jsonl`` (0 when none)."""
    path = run_dir / runs.METRICS
    if not path.is_file():
        return 0
    for line in reversed(path.read_text().splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a torn last line: look at the one before
            continue
    return 0


def pretrain_cell(cell: Cell) -> tuple[str | None, float]:
    """Pretrain (or continue, or keep) one cell; returns (stopped_by signal or None, seconds
    spent now). A run that died before its first checkpoint starts again from scratch."""
    from mimar.pretrain import pretrain

    state = run_state(cell.run_dir, cell.steps)
    if state == "finished":
        return None, 0.0
    if state == "missing" and cell.run_dir.exists():
        shutil.rmtree(cell.run_dir)
    tic = time.perf_counter()
    result = pretrain(cell.config(), cell.run_dir, resume=state == "unfinished")
    return result.stopped_by, time.perf_counter() - tic


def missing_evals(cell: Cell, protocols: tuple[str, ...]) -> list[str]:
    return [p for p in protocols if not (cell.run_dir / runs.EVAL / f"{p}.json").is_file()]


def evaluate_cell(cell: Cell, settings: QualityConfig) -> float:
    """Run the protocols whose ``RUN/eval/<protocol>.json`` is missing, with baselines;
    returns the seconds spent."""
    from mimar.protocols import evaluate, request

    todo = missing_evals(cell, settings.protocols)
    if not todo:
        return 0.0
    tic = time.perf_counter()
    cfg = request(
        todo,
        checkpoint=cell.run_dir,
        baselines=True,
        max_train=settings.max_train,
        max_test=settings.max_test,
        feature_cache=False,  # ~35 MB per model on Fashion-MNIST, and every run is new
    )
    evaluate(cfg)
    return time.perf_counter() - tic


# --- calibration -----------------------------------------------------------------------------


def calibrate(settings: QualityConfig, out: Path, method: str, teacher: Path | None) -> dict:
    """Time ``calibration_steps`` steps of ``method`` in ``OUT/calibration/<method>/``; the
    median step after the first two (start-up, first allocations) is its seconds/step."""
    from mimar.pretrain import pretrain

    run_dir = out / "calibration" / method
    if run_dir.exists():
        shutil.rmtree(run_dir)
    words = [*method_overrides(settings, method), "train.seed=0", "train.log_every=1"]
    words += [f"train.steps={settings.calibration_steps}", "train.checkpoint_every=0"]
    words += teacher_words(teacher) if teacher is not None else []
    cfg = load_config(recipes()[method], [*words, "train.progress=false"])
    pretrain(cfg, run_dir)
    per_step = images_per_step(cfg)
    timed = [seconds for _, seconds in step_seconds(run_dir, per_step)]
    seconds = timed[2:] or timed
    return {
        "seconds_per_step": statistics.median(seconds),
        "images_per_step": per_step,
        "steps_timed": len(seconds),
        "backbone": cfg.backbone.name,
        "backbone_params": backbone_params(cfg),
        "method": cfg.method.name,
        "data": to_dict(cfg.data),
    }


def images_per_step(cfg: PretrainConfig) -> int:
    return cfg.data.batch_size * cfg.train.accum_steps


def backbone_params(cfg: PretrainConfig) -> int:
    """Parameters of the network the probes see (iTPN: HiViT with its pyramid neck)."""
    from mimar.loading import random_init_backbone

    return sum(p.numel() for p in random_init_backbone(cfg).parameters())


def calibrate_all(settings: QualityConfig, out: Path, order: list[str], bar: BenchProgress) -> dict:
    """Measured seconds/step per method of ``order``, from ``calibration.json`` when stored."""
    path = out / CALIBRATION_FILE
    stored = json.loads(path.read_text()) if path.is_file() else {}
    for method in order:
        if method in stored:
            bar.skip(("calibrate", method, 0), f"calibrate {method}")
            continue
        taught = method != TEACHER_METHOD
        teacher = calibration_teacher(settings, out, method, stored) if taught else None
        with bar.phase(("calibrate", method, 0), f"calibrate {method}"):
            stored[method] = calibrate(settings, out, method, teacher)
        writes.write_text(path, json.dumps(stored, indent=2) + "\n", "calibration")
    return stored


def calibration_teacher(settings: QualityConfig, out: Path, method: str, stored: dict):
    """The teacher a calibration run of ``method`` uses: ``--teacher``, else the SimMIM
    calibration run (same network as the real teacher, so the same step time)."""
    if not needs_teacher(settings, method):
        return None
    if settings.teacher:
        return Path(settings.teacher)
    run_dir = out / "calibration" / TEACHER_METHOD
    if run_state(run_dir, settings.calibration_steps) != "finished":  # removed since: redo it
        calibrate(settings, out, TEACHER_METHOD, None)
    return run_dir


# --- the bench -------------------------------------------------------------------------------


def method_order(settings: QualityConfig) -> tuple[list[str], bool]:
    """Methods in running order (SimMIM first), and whether SimMIM runs only as a teacher."""
    taught = not settings.teacher and any(needs_teacher(settings, m) for m in settings.methods)
    order = list(settings.methods)
    teacher_only = taught and TEACHER_METHOD not in order
    if taught:
        order = [TEACHER_METHOD] + [m for m in order if m != TEACHER_METHOD]
    return order, teacher_only


MONITOR_POINTS = 4  # online kNN points per run (the report's kNN-vs-time curve)


def monitor_words(settings: QualityConfig, steps: int) -> list[str]:
    """The online monitor of every run: MONITOR_POINTS probes (the last at the end), on the
    evaluation's subset sizes when --max-train / --max-test are given."""
    words = [f"train.monitor_every={max(1, steps // MONITOR_POINTS)}"]
    words += [f"train.monitor_bank={settings.max_train}"] if settings.max_train >= 2 else []
    words += [f"train.monitor_queries={settings.max_test}"] if settings.max_test else []
    return words


def plan_cells(settings: QualityConfig, out: Path, calibration: dict, order: list[str]):
    """Every cell of the bench, seed by seed, each method's steps from the planner."""
    cells = []
    teacher_only = TEACHER_METHOD not in settings.methods
    for seed in range(settings.seeds):
        for method in order:
            steps = plan_steps(
                seconds_per_step=calibration[method]["seconds_per_step"],
                images_per_step=calibration[method]["images_per_step"],
                budget_seconds=settings.budget_seconds,
                budget_images=settings.budget_images,
            )
            words = [*method_overrides(settings, method), f"train.seed={seed}"]
            words.append(f"train.steps={steps}")
            words += monitor_words(settings, steps)
            if needs_teacher(settings, method):
                teacher = settings.teacher or out / "runs" / f"{TEACHER_METHOD}-seed{seed}"
                words += teacher_words(teacher)
            evaluated = not (method == TEACHER_METHOD and teacher_only)
            run_dir = out / "runs" / f"{method}-seed{seed}"
            cells.append(Cell(method, seed, run_dir, tuple(words), steps, evaluated))
    return cells


def open_bench(out: Path, given: dict, resume: bool) -> QualityConfig:
    """The bench's settings: new ones (``given``, stored in ``OUT/bench.json``), or on
    ``resume`` the stored ones, refusing any given option that differs from them."""
    path = out / BENCH_FILE
    busy = out.is_dir() and any(out.iterdir())
    if busy and not resume:
        raise ConfigError(
            f"{out} is not empty: pass --resume to continue its bench, or choose another --out"
        )
    if busy and not path.is_file():
        raise ConfigError(f"{out} holds no {BENCH_FILE}: it is not a bench folder to resume")
    if not busy:
        settings = QualityConfig(**given)
        writes.write_text(path, json.dumps(asdict(settings), indent=2) + "\n", "bench settings")
        return settings
    stored = QualityConfig(**json.loads(path.read_text()))
    wanted = QualityConfig(**(asdict(stored) | given))
    for f in fields(QualityConfig):
        if getattr(wanted, f.name) != getattr(stored, f.name):
            raise ConfigError(
                f"{out} was started with {f.name}={getattr(stored, f.name)!r}, not "
                f"{getattr(wanted, f.name)!r}: resume without that option, or choose another --out"
            )
    return stored


def run_quality(out: str | Path, given: dict, resume: bool = False) -> Path | None:
    """Run (or continue) the bench in ``out``; returns the report folder, or None when a
    signal stopped a pretraining run (its checkpoint is saved: continue with ``--resume``)."""
    out = Path(out)
    settings = open_bench(out, given, resume)
    check_teacher(settings)
    order, _ = method_order(settings)
    bar = BenchProgress(settings, order)
    with bar:
        calibration = calibrate_all(settings, out, order, bar)
        cells = plan_cells(settings, out, calibration, order)
        bar.plan(cells, calibration)
        timings = load_timings(out)
        for cell in cells:
            if not run_cell(cell, settings, bar, timings):
                save_timings(out, timings)
                return None
            save_timings(out, timings)
    write_report(out, bench_record(settings, cells, calibration, timings))
    return out


def run_cell(cell: Cell, settings: QualityConfig, bar: BenchProgress, timings: dict) -> bool:
    """Pretrain then evaluate one cell; False when a signal stopped its pretraining."""
    from mimar.engine.loop import NonFiniteLoss

    record = timings.setdefault(cell.name, {})
    where = f"{cell.method} seed {cell.seed}"
    if run_state(cell.run_dir, cell.steps) == "finished":
        bar.skip(("pretrain", cell.method, cell.seed), f"{where}: pretrain")
    else:
        with bar.phase(
            ("pretrain", cell.method, cell.seed), f"{where}: pretrain {cell.steps} steps"
        ):
            try:
                stopped, seconds = pretrain_cell(cell)
            except NonFiniteLoss as err:  # one diverging method does not stop the bench
                log.warning("bench: %s diverged: %s", cell.name, err)
                record["error"] = str(err)
                return True
        record["pretrain_wall_seconds"] = record.get("pretrain_wall_seconds", 0.0) + seconds
        record.pop("error", None)
        if stopped:
            log.warning("bench stopped by %s; continue with --resume", stopped)
            return False
    key = ("eval", cell.method, cell.seed)
    if not cell.evaluated or not missing_evals(cell, settings.protocols):
        bar.skip(key, f"{where}: eval")
        return True
    with bar.phase(key, f"{where}: eval {','.join(missing_evals(cell, settings.protocols))}"):
        record["eval_wall_seconds"] = evaluate_cell(cell, settings)
    return True


def check_teacher(settings: QualityConfig) -> None:
    if settings.teacher and not Path(settings.teacher).exists():
        raise ConfigError(f"--teacher {settings.teacher}: no mimar run folder or file there")


def load_timings(out: Path) -> dict:
    path = out / TIMINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_timings(out: Path, timings: dict) -> None:
    writes.write_text(out / TIMINGS_FILE, json.dumps(timings, indent=2) + "\n", "timings")


def bench_record(settings: QualityConfig, cells: list[Cell], calibration: dict, timings: dict):
    """Everything the report needs, as plain JSON-able values."""
    return {
        "settings": asdict(settings),
        "calibration": calibration,
        "runs": [
            {
                "name": c.name,
                "method": c.method,
                "seed": c.seed,
                "run_dir": str(c.run_dir),
                "steps": c.steps,
                "evaluated": c.evaluated,
                "teacher": next(
                    (w.split("=", 1)[1] for w in c.overrides if w.startswith("teacher.path=")), None
                ),
                "commands": c.commands(settings),
                **timings.get(c.name, {}),
            }
            for c in cells
        ],
    }


# --- progress ----------------------------------------------------------------------------------

Key = tuple[str, str, int]  # (phase kind: calibrate / pretrain / eval, method, seed)


@dataclass
class _Phase:
    key: Key
    estimate: float  # seconds
    done: bool = False
    actual: float = 0.0


@dataclass
class BenchProgress:
    """Which method, seed and phase runs, with an ETA for the whole bench: a rich bar on a
    terminal, else one log line per phase. The ETA scales the guess of every pending phase by
    how long the finished phases of its kind took against their guesses."""

    settings: QualityConfig
    order: list[str]
    phases: dict[Key, _Phase] = field(default_factory=dict)
    progress: Progress | None = None

    def __post_init__(self) -> None:
        s = self.settings
        guess = s.budget_seconds or s.budget_images / 300.0  # ~300 img/s on 2 CPU cores
        keys, n = [(("calibrate", m, 0), 15.0) for m in self.order], len(s.protocols)
        for seed in range(s.seeds):
            for m in self.order:
                keys += [(("pretrain", m, seed), guess + 10), (("eval", m, seed), 40.0 * n)]
        self.phases = {key: _Phase(key, estimate) for key, estimate in keys}

    def plan(self, cells: list[Cell], calibration: dict) -> None:
        """Replace the pretraining guesses by planned steps x measured seconds/step."""
        for c in cells:
            per_step = calibration[c.method]["seconds_per_step"]
            self.phases["pretrain", c.method, c.seed].estimate = c.steps * per_step + 10

    def __enter__(self) -> BenchProgress:
        console = Console(stderr=True)
        if console.is_terminal:
            columns = (TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn())
            columns += (TextColumn("{task.description}"), TimeElapsedColumn())
            columns += (TextColumn("eta {task.fields[eta]}"),)
            self.progress = Progress(*columns, console=console)
            self.task = self.progress.add_task("", total=len(self.phases), eta="?")
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def skip(self, key: Key, label: str) -> None:
        """A phase kept from an earlier run of the bench (or with nothing to do)."""
        phase = self.phases[key]
        phase.done, phase.estimate = True, 0.0
        self._show(f"{label}: kept")

    @contextmanager
    def phase(self, key: Key, label: str) -> Iterator[None]:
        """Show ``label`` while the block runs; time it."""
        self._show(label)
        tic = time.perf_counter()
        yield
        self.phases[key].done, self.phases[key].actual = True, time.perf_counter() - tic

    def eta(self) -> float:
        """Seconds left: pending guesses, each scaled by its kind's actual / guessed ratio."""
        left = 0.0
        for kind in ("calibrate", "pretrain", "eval"):
            mine = [p for p in self.phases.values() if p.key[0] == kind]
            done = [p for p in mine if p.done and p.actual]
            ratio = sum(p.actual for p in done) / sum(p.estimate for p in done) if done else 1.0
            left += ratio * sum(p.estimate for p in mine if not p.done)
        return left

    def _show(self, label: str) -> None:
        finished = sum(p.done for p in self.phases.values())
        eta = _duration(self.eta())
        if self.progress is not None:
            self.progress.update(self.task, completed=finished, description=label, eta=eta)
        else:
            log.info("bench [%d/%d] %s (bench eta %s)", finished, len(self.phases), label, eta)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
