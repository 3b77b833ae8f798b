"""The bench's report: every number comes from a run's own ``RUN/eval/<protocol>.json``.

Per protocol and method: mean ± sample std (N - 1) over seeds; the method with the best mean
is marked, and so is every method *within noise of the best* (:data:`NOISE_RULE`). Writes
``report.json``, ``report.md`` and four plots: ``accuracy.png`` (bars with error bars and the
baselines), ``loss_vs_time.png`` (each method's loss against its training wall time) and
``pictures.png`` (each method's run picture), ``knn_vs_time.png`` (the online monitor's kNN
against training time, all methods). Figures use ``matplotlib.figure.Figure`` on the
Agg canvas, without pyplot, as :mod:`mimar.viz`.

Why one file of ~560 lines: every number, table and plot of the bench's report, each a short
function of the same run records; the control flow is :mod:`mimar.bench.quality`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path

import torch
import yaml

from mimar import runs, writes
from mimar.evaluation.report import write_json

NOISE_RULE = (
    "within noise of the best: |mean - mean_best| <= std + std_best (sample std over seeds, "
    "N - 1); with one seed there is no std and no such mark"
)
BASELINES = ("random init", "raw pixels")


# --- reading the runs ------------------------------------------------------------------------


def metrics_rows(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / runs.METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def images_per_step(run_dir: str | Path) -> int:
    """``data.batch_size * train.accum_steps`` of a run (its ``config.yaml``)."""
    cfg = yaml.safe_load((Path(run_dir) / runs.CONFIG).read_text())
    return cfg["data"]["batch_size"] * cfg["train"].get("accum_steps", 1)


def step_seconds(run_dir: str | Path, per_step: int | None = None) -> list[tuple[int, float]]:
    """``(step, seconds of the window ending there)`` for every logged training row; the
    engine logs ``images_per_s`` over the steps since the previous row (no evals or saves)."""
    per_step = per_step or images_per_step(run_dir)
    out, previous = [], 0
    for row in metrics_rows(run_dir):
        if "images_per_s" in row:
            out.append((row["step"], (row["step"] - previous) * per_step / row["images_per_s"]))
            previous = row["step"]
    return out


def loss_curve(run_dir: str | Path) -> tuple[list[float], list[float]]:
    """Cumulative training seconds and loss at every logged step."""
    losses = {r["step"]: r["loss"] for r in metrics_rows(run_dir) if "loss" in r}
    seconds, total = [], 0.0
    for step, s in step_seconds(run_dir):
        total += s
        seconds.append((total, losses[step]))
    return [t for t, _ in seconds], [v for _, v in seconds]


def knn_curve(run_dir: str | Path) -> tuple[list[float], list[float]]:
    """The online monitor's kNN top-1 (``monitor/knn_top1``) against the training seconds up
    to its step (the loss curve's clock: no evaluation, save or probe time)."""
    rows = metrics_rows(run_dir)
    knn = {r["step"]: r["monitor/knn_top1"] for r in rows if "monitor/knn_top1" in r}
    seconds, total = [], 0.0
    for step, s in step_seconds(run_dir):
        total += s
        if step in knn:
            seconds.append((total, knn[step]))
    return [t for t, _ in seconds], [v for _, v in seconds]


CLIMBING = 0.5  # kNN points gained between a run's last two probes: "still climbing"


def knn_summary(runs_: dict[str, dict], methods: list[str]) -> dict:
    """Per method: each seed's online kNN curve, the mean gain over the last probe interval
    and whether that gain exceeds :data:`CLIMBING` (still climbing at the budget's end)."""
    out = {}
    for m in methods:
        curves = {r["seed"]: knn_curve(r["run_dir"]) for r in runs_.values() if r["method"] == m}
        curves = {seed: c for seed, c in curves.items() if c[1]}
        gains = [c[1][-1] - c[1][-2] for c in curves.values() if len(c[1]) > 1]
        gain = statistics.fmean(gains) if gains else None
        last = [c[1][-1] for c in curves.values()]
        out[m] = {
            "curves": {str(seed): {"seconds": c[0], "top1": c[1]} for seed, c in curves.items()},
            "last": mean_std(last),
            "last_gain": gain,
            "climbing": None if gain is None else gain > CLIMBING,
        }
    return out


def train_seconds(run_dir: str | Path) -> float | None:
    """Seconds spent in training steps (start-up, saving and drawing not counted)."""
    if not (Path(run_dir) / runs.METRICS).is_file():
        return None
    return sum(s for _, s in step_seconds(run_dir))


def eval_scores(run_dir: str | Path, protocol: str) -> dict[str, float]:
    """``{model: top-1}`` of a run's ``eval/<protocol>.json`` (pretrained and the controls)."""
    payload = json.loads((Path(run_dir) / runs.EVAL / f"{protocol}.json").read_text())
    return {row["model"]: row["top1"] for row in payload["rows"]}


def eval_notes(run_dir: str | Path, protocol: str) -> str:
    payload = json.loads((Path(run_dir) / runs.EVAL / f"{protocol}.json").read_text())
    return payload["rows"][0]["notes"] if payload["rows"] else ""


def machine() -> dict:
    """CPU model, cores, torch version and threads (and the GPU, if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --- statistics ------------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict:
    """Mean and sample std (N - 1; None for one value) of ``values``."""
    return {
        "values": values,
        "n": len(values),
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
    }


def mark_noise(stats: dict[str, dict]) -> None:
    """Flag ``best`` (highest mean) and ``within_noise`` (:data:`NOISE_RULE`) in place."""
    scored = {m: s for m, s in stats.items() if s["mean"] is not None}
    if not scored:
        return
    best = max(scored, key=lambda m: scored[m]["mean"])
    b = scored[best]
    for method, s in stats.items():
        s["best"] = method == best
        close = s["mean"] is not None and s["std"] is not None and b["std"] is not None
        s["within_noise"] = bool(
            close and not s["best"] and abs(s["mean"] - b["mean"]) <= s["std"] + b["std"]
        )


def _stats_of(scores: list[dict], model: str) -> dict:
    return mean_std([e[model] for e in scores if model in e])


def summarize(runs_: dict[str, dict], methods: list[str], protocols: list[str]) -> dict:
    """Per protocol: each method's pretrained stats (noise-marked), its random-init control,
    and raw pixels over every run."""
    summary = {}
    for p in protocols:
        evaluated = [r["eval"][p] for r in runs_.values() if p in r.get("eval", {})]
        by_method = {
            m: [r["eval"][p] for r in runs_.values() if r["method"] == m and p in r["eval"]]
            for m in methods
        }
        pretrained = {m: mean_std([e["pretrained"] for e in es]) for m, es in by_method.items()}
        mark_noise(pretrained)
        summary[p] = {
            "methods": pretrained,
            "random init": {m: _stats_of(es, "random init") for m, es in by_method.items()},
            "raw pixels": _stats_of(evaluated, "raw pixels"),
        }
    return summary


# --- the report ------------------------------------------------------------------------------


def build_report(record: dict) -> dict:
    """report.json's content from the bench's record (settings, calibration, runs)."""
    settings, calibration = record["settings"], record["calibration"]
    methods, protocols = list(settings["methods"]), list(settings["protocols"])
    runs_ = {}
    for run in record["runs"]:
        entry = dict(run, train_seconds=train_seconds(run["run_dir"]))
        done = [p for p in protocols if (Path(run["run_dir"]) / runs.EVAL / f"{p}.json").is_file()]
        entry["eval"] = (
            {p: eval_scores(run["run_dir"], p) for p in done} if run["evaluated"] else {}
        )
        runs_[run["name"]] = entry
    detail = {}
    for m in dict.fromkeys([r["method"] for r in record["runs"]]):
        c, steps = calibration[m], next(r["steps"] for r in record["runs"] if r["method"] == m)
        detail[m] = {
            "backbone": c["backbone"],
            "backbone_params": c["backbone_params"],
            "planned_steps": steps,
            "seconds_per_step": c["seconds_per_step"],
            "images_per_step": c["images_per_step"],
            "images_seen": steps * c["images_per_step"],
            "planned_seconds": steps * c["seconds_per_step"],
        }
    return {
        "methods": methods,
        "seeds": list(range(settings["seeds"])),
        "protocols": protocols,
        "budget": _budget(settings),
        "machine": machine(),
        "settings": settings,
        "noise_rule": NOISE_RULE,
        "planned_steps": {m: d["planned_steps"] for m, d in detail.items()},
        "seconds_per_step": {m: d["seconds_per_step"] for m, d in detail.items()},
        "method_details": detail,
        "teacher": _teacher(settings, runs_),
        "differences": differences(calibration, list(detail)),
        "summary": summarize(runs_, methods, protocols),
        "online_knn": knn_summary(runs_, list(detail)),
        "runs": runs_,
        "eval_notes": _first_notes(runs_, protocols),
    }


def _budget(settings: dict) -> dict:
    if settings["budget_images"] is not None:
        return {"kind": "images", "images": settings["budget_images"]}
    minutes = settings["budget_minutes"]
    return {"kind": "wall-clock", "minutes": minutes, "seconds": 60.0 * minutes}


def _teacher(settings: dict, runs_: dict) -> dict:
    """Who taught EVA / D-iGPT / iTPN-CLIP and what that teacher's pretraining cost."""
    taught = sorted({r["method"] for r in runs_.values() if r.get("teacher")})
    if settings["teacher"]:
        seconds = train_seconds(settings["teacher"]) if Path(settings["teacher"]).is_dir() else None
        return {"taught": taught, "source": settings["teacher"], "train_seconds": seconds}
    teachers = {r["teacher"] for r in runs_.values() if r.get("teacher")}
    cost = {
        r["name"]: {
            "train_seconds": r["train_seconds"],
            "wall_seconds": r.get("pretrain_wall_seconds"),
        }
        for r in runs_.values()
        if r["run_dir"] in teachers
    }
    return {"taught": taught, "source": "the bench's own SimMIM run of the same seed", "cost": cost}


def differences(calibration: dict, methods: list[str]) -> list[str]:
    """Sentences naming what is not the same across methods: backbones, data settings."""
    notes = []
    groups: dict[tuple, list[str]] = {}
    for m in methods:
        c = calibration[m]
        groups.setdefault((c["backbone"], c["backbone_params"]), []).append(m)
    if len(groups) > 1:
        parts = [f"{b} {_params(n)} params ({', '.join(ms)})" for (b, n), ms in groups.items()]
        notes.append(
            "backbone sizes differ: " + "; ".join(parts) + ". Swin and HiViT cannot be the same "
            "ViT, and each ViT follows its paper (AIM: no class token or biases; D-iGPT: no "
            "final norm); compare across rows with the sizes in mind"
        )
    data = {m: calibration[m]["data"] for m in methods}
    keys = sorted({k for d in data.values() for k in d})
    for key in keys:
        values = {m: d.get(key) for m, d in data.items()}
        if len({json.dumps(v) for v in values.values()}) > 1:
            notes.append(f"data.{key} differs: " + ", ".join(f"{m} {v}" for m, v in values.items()))
    return notes


def _first_notes(runs_: dict, protocols: list[str]) -> dict:
    for r in runs_.values():
        if r["eval"]:
            return {p: eval_notes(r["run_dir"], p) for p in protocols if p in r["eval"]}
    return {}


def write_report(out: str | Path, record: dict) -> dict:
    """Write report.json, report.md, accuracy.png, loss_vs_time.png and pictures.png."""
    out = Path(out)
    report = build_report(record)
    write_json(out / "report.json", report)
    writes.write_text(out / "report.md", markdown(report), "report")
    plot_accuracy(report, out / "accuracy.png")
    plot_loss_vs_time(report, out / "loss_vs_time.png")
    plot_pictures(report, out / "pictures.png")
    plot_knn_vs_time(report, out / "knn_vs_time.png")
    return report


# --- markdown --------------------------------------------------------------------------------


def cell(stats: dict) -> str:
    """``mean ± std`` (just the value for one seed), bold when best, ≈ when within noise."""
    if stats.get("mean") is None:
        return "n/a"
    text = f"{stats['mean']:.2f}" + (f" ± {stats['std']:.2f}" if stats["std"] is not None else "")
    if stats.get("best"):
        return f"**{text}**"
    return f"{text} ≈" if stats.get("within_noise") else text


def markdown(report: dict) -> str:
    """report.md: the table, the budget, the machine, fairness notes and rerun commands."""
    protocols, detail, summary = report["protocols"], report["method_details"], report["summary"]
    lines = [f"# mimar bench quality: {report['settings']['data']}", "", _budget_line(report)]
    lines += [_machine_line(report["machine"]), ""]
    lines += ["## Top-1 (%) of the frozen pretrained backbones", ""]
    lines.append(f"| method | backbone | params | steps | s/step | images | {_join(protocols)} |")
    lines += ["|" + "---|" * (6 + len(protocols))]
    for m in report["methods"]:
        d = detail[m]
        cells = [cell(summary[p]["methods"][m]) for p in protocols]
        lines.append(
            f"| {m} | {d['backbone']} | {_params(d['backbone_params'])} | {d['planned_steps']} | "
            f"{d['seconds_per_step']:.3f} | {d['images_seen']} | " + " | ".join(cells) + " |"
        )
    lines += ["", f"**bold**: best mean per protocol; ≈: {report['noise_rule']}.", ""]
    lines += ["## Baselines (the same evaluation, from each run's eval JSON)", ""]
    lines += ["| model | " + " | ".join(protocols) + " |", "|" + "---|" * (1 + len(protocols))]
    lines.append(f"| raw pixels | {_join(cell(summary[p]['raw pixels']) for p in protocols)} |")
    for m in report["methods"]:
        row = " | ".join(cell(summary[p]["random init"][m]) for p in protocols)
        lines.append(f"| random init ({m}) | {row} |")
    lines += ["", "## Evaluation", ""]
    lines += [f"- {p}: {note}" for p, note in report["eval_notes"].items()]
    lines.append(
        "- every run alike: final normed tokens, mean-pooled, bidirectional attention, with "
        "the baselines of `mimar eval ... --baselines`"
    )
    lines += _online_knn_lines(report.get("online_knn", {}))
    lines += ["", "## Teacher", "", _teacher_line(report["teacher"]), ""]
    lines += ["## What differs between methods", ""]
    lines += [f"- {note}" for note in report["differences"]] or ["- nothing but the method"]
    lines += ["", "## Rerun one cell", "", "```sh"]
    for run in report["runs"].values():
        lines += [f"# {run['name']}", *run["commands"]]
    lines += [
        "```",
        "",
        "Files: report.json, accuracy.png, loss_vs_time.png, pictures.png, knn_vs_time.png, "
        "runs/<method>-seed<k>/ (full run folders), calibration/ (not counted).",
        "",
    ]
    return "\n".join(lines)


def _online_knn_lines(online: dict) -> list[str]:
    """The monitor's section: last online kNN and whether each method was still climbing."""
    if not any(o["curves"] for o in online.values()):
        return []
    lines = ["", "## Online kNN during training (the monitor; knn_vs_time.png)", ""]
    lines += ["| method | last online kNN | gain over the last interval | at the budget's end |"]
    lines += ["|---|---|---|---|"]
    for m, o in online.items():
        if not o["curves"]:
            continue
        gain = "-" if o["last_gain"] is None else f"{o['last_gain']:+.2f}"
        verdict = {True: "still climbing", False: "flat", None: "-"}[o["climbing"]]
        lines.append(f"| {m} | {cell(o['last'])} | {gain} | {verdict} |")
    lines += ["", f"Still climbing: a mean gain above {CLIMBING} points between the last two "]
    lines[-1] += "probes (the monitor's own subsets, not the evaluation's splits)."
    return lines


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n / 1e3:.1f}k"


def _join(cells) -> str:
    return " | ".join(cells)


def _budget_line(report: dict) -> str:
    b, s = report["budget"], report["settings"]
    if b["kind"] == "images":
        what = f"{b['images']} training images per method"
    else:
        what = (
            f"{b['minutes']:g} min of training steps per method: train.steps = floor(budget / "
            f"seconds per step), the step time measured by a {s['calibration_steps']}-step "
            "calibration run (not counted; start-up, checkpoints and pictures not counted)"
        )
    seeds = ", ".join(map(str, report["seeds"]))
    crop = s["crop_scale"]
    return (
        f"Budget: {what}. Seeds (train.seed): {seeds}. Every method: the same data "
        f"({s['data']}{', ' + s['data_root'] if s['data_root'] else ''}), crop scale "
        f"[{crop[0]}, {crop[1]}], protocols {', '.join(report['protocols'])}."
    )


def _machine_line(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads){gpu}; "
        f"torch {m['torch']}, Python {m['python']}."
    )


def _teacher_line(t: dict) -> str:
    if not t["taught"]:
        return "No method of this bench needs a teacher."
    who = ", ".join(t["taught"])
    if "cost" not in t:
        spent = "unknown" if t["train_seconds"] is None else f"{t['train_seconds']:.1f} s of steps"
        return f"Taught ({who}) by {t['source']} (--teacher); its pretraining took {spent}."
    costs = "; ".join(
        f"{name}: {c['train_seconds']:.1f} s of steps"
        + (f" ({c['wall_seconds']:.1f} s wall)" if c.get("wall_seconds") else "")
        for name, c in t["cost"].items()
        if c["train_seconds"] is not None
    )
    return (
        f"Taught ({who}) by {t['source']}, pretrained first under the same budget: {costs}. "
        "Their total cost is their own budget plus the teacher's."
    )


# --- plots -----------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # renders to files; no display, no pyplot
    return fig


def plot_accuracy(report: dict, path: Path) -> None:
    """One panel per protocol: each method's mean top-1 with its std as error bar, its
    random-init control beside it, raw pixels as a dashed line."""
    methods, protocols = report["methods"], report["protocols"]
    fig = _figure(max(4.0, 1.1 * len(methods)) * len(protocols), 4.2)
    axes = fig.subplots(1, len(protocols), squeeze=False)[0]
    x = list(range(len(methods)))
    for ax, p in zip(axes, protocols):
        s = report["summary"][p]
        for offset, stats, style in (
            (-0.2, s["methods"], dict(color="C0", label="pretrained")),
            (0.2, s["random init"], dict(color="0.75", hatch="//", label="random init")),
        ):
            means = [_nan(stats[m]["mean"]) for m in methods]
            errs = [stats[m]["std"] or 0.0 for m in methods]
            ax.bar([i + offset for i in x], means, 0.4, yerr=errs, capsize=3, **style)
        pixels = s["raw pixels"]["mean"]
        if pixels is not None:
            ax.axhline(pixels, color="k", linestyle="--", linewidth=1, label="raw pixels")
        values = [v for v in _all_means(s) if v is not None]
        if values:
            ax.set_ylim(max(0.0, min(values) - 10), min(102.0, max(values) + 5))
        ax.set_xticks(x, methods, rotation=30, ha="right")
        ax.set_title(f"{p} (mean ± std over {len(report['seeds'])} seed(s))")
        ax.set_ylabel("test top-1 (%)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    _save_picture(fig, path, 110)


def _save_picture(fig, path: Path, dpi: int) -> None:
    """A picture is optional: a failed write is a warning, and the report goes on."""
    import matplotlib.pyplot as plt

    with writes.optional("picture"):
        writes.save_with(path, lambda name: fig.savefig(name, dpi=dpi), "picture")
    plt.close(fig)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _all_means(s: dict) -> list[float | None]:
    groups = [*s["methods"].values(), *s["random init"].values(), s["raw pixels"]]
    return [stats["mean"] for stats in groups]


def plot_loss_vs_time(report: dict, path: Path) -> None:
    """One panel per method (losses differ in kind): loss against training seconds, one line
    per seed."""
    methods = list(report["method_details"])
    cols = min(3, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig = _figure(4.2 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, m in zip(axes, methods):
        for run in (r for r in report["runs"].values() if r["method"] == m):
            seconds, losses = loss_curve(run["run_dir"])
            ax.plot(seconds, losses, linewidth=1, label=f"seed {run['seed']}")
        ax.set_title(m)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
    for ax in axes[len(methods) :]:
        ax.set_visible(False)
    fig.tight_layout()
    _save_picture(fig, path, 110)


def plot_knn_vs_time(report: dict, path: Path) -> None:
    """One panel, every method: the online kNN top-1 against training wall time, the mean
    over seeds (per probe) and its min-max spread."""
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    for i, (m, o) in enumerate(report.get("online_knn", {}).items()):
        curves = list(o["curves"].values())
        if not curves:
            continue
        n = min(len(c["top1"]) for c in curves)  # the same probe steps for every seed
        t = [statistics.fmean(c["seconds"][k] for c in curves) for k in range(n)]
        ys = [[c["top1"][k] for c in curves] for k in range(n)]
        ax.plot(t, [statistics.fmean(y) for y in ys], "o-", color=f"C{i}", label=m, markersize=3)
        if len(curves) > 1:
            ax.fill_between(t, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.2)
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("online kNN top-1 (%)")
    ax.set_title(f"online kNN (mean, min-max over {len(report['seeds'])} seed(s))")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_picture(fig, path, 110)


def plot_pictures(report: dict, path: Path) -> None:
    """Each method's run picture (its first seed) side by side."""
    from matplotlib.image import imread

    methods = list(report["method_details"])
    first = {m: next(r for r in report["runs"].values() if r["method"] == m) for m in methods}
    paths = {m: Path(first[m]["run_dir"]) / runs.PICTURE for m in methods}
    pictures = {m: imread(path) for m, path in paths.items() if path.is_file()}
    aspect = max([p.shape[0] / p.shape[1] for p in pictures.values()] or [0.5])
    fig = _figure(4.5 * len(methods), 4.5 * aspect + 0.6)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, m in zip(axes, methods):
        if m in pictures:
            ax.imshow(pictures[m])
        else:
            ax.text(0.5, 0.5, "no picture", ha="center", va="center")
        ax.set_title(f"{m} (seed {first[m]['seed']})")
        ax.axis("off")
    fig.tight_layout()
    _save_picture(fig, path, 130)
