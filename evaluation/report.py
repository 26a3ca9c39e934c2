"""Reports of an evaluation run: report.json (every per-edit figure), report.md (a comparison
table naming protocol and definitions) and PNG plots (metrics against the number of edits;
retention curves). build_report() reads a run directory (see evaluation/runner.py);
render_report() writes the files and is what `editkit report DIR` calls again."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from editkit.errors import InvalidRequest
from editkit.store import Journal, atomic_write_text

from editkit.scoring import DEFINITIONS, METRIC_LABELS, METRICS, mean, summarise
from .rundir import PROTOCOLS, read_jsonl

REPORT_FORMAT = 1


def _stats(workspace: Path) -> list[dict]:
    """Per-edit training statistics (seconds, loss, steps...) from a workspace journal."""
    path = workspace / "journal.sqlite"
    if not path.exists():
        return []
    journal = Journal(path, readonly=True)
    try:
        return [r.stats for r in journal.records(active_only=True)]
    finally:
        journal.close()


def build_report(out: str | Path) -> dict[str, Any]:
    """Assemble report.json from the run directory (complete or interrupted) and write it."""
    out = Path(out)
    try:
        plan = json.loads((out / "run.json").read_text(encoding="utf-8"))
        base = json.loads((out / "baseline.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{out} is not an evaluation run directory ({exc})") from None
    cases, protocol = plan["cases"], plan["protocol"]
    n = len(cases)
    base_rows = [item["metrics"] if item else None for item in base["items"]]  # None: a record no point measures
    measured_base = [row for row in base_rows if row is not None]
    report: dict[str, Any] = {
        "format": REPORT_FORMAT, "created_at": time.time(),
        "suite": plan["suite"], "data": plan["data"], "model": plan["model"], "fingerprint": base["fingerprint"],
        "protocol": protocol, "protocol_description": PROTOCOLS[protocol], "definitions": DEFINITIONS,
        "metric_labels": METRIC_LABELS, "edits": n, "every": plan["every"], "group_size": plan["group_size"],
        "seed": plan["seed"], "select": plan["select"], "records_read": plan["records_read"],
        "at": plan.get("at"), "turn_size": plan.get("turn_size", 1), "sample": plan.get("sample"),
        "skipped": plan["skipped"],
        "baseline": {"summary": summarise(measured_base), "per_edit": base_rows, "records": len(measured_base)},
        "methods": {},
    }
    for method, config in plan["methods"].items():
        folder = out / "methods" / method
        rows = read_jsonl(folder / "measurements.jsonl")
        if protocol == "groups":
            stats = [s for g in sorted((folder / "groups").glob("g*")) for s in _stats(g)]
        else:
            stats = _stats(folder / "workspace")
        latest: dict[int, dict] = {}  # each edit's figures at the protocol's reporting point
        for row in sorted(rows, key=lambda r: r["step"]):
            for i, metrics in row["items"].items():
                latest[int(i)] = metrics
        if protocol in ("final", "retention"):
            last = [r for r in rows if r["step"] == n]
            complete = bool(last)
            latest = {int(i): m for i, m in last[0]["items"].items()} if last else {}
        else:
            complete = len(latest) == n
        per_edit = []
        for i, case in enumerate(cases):
            req = case["request"]
            per_edit.append({"edit": i + 1, "record": case["index"], "prompt": req["prompt"],
                             "target_new": req["target_new"], "metrics": latest.get(i),
                             "stats": stats[i] if i < len(stats) else None})
        seconds = [s.get("seconds") for s in stats if s]
        report["methods"][method] = {
            "config": config, "complete": complete, "edits_applied": len(stats),
            "summary": summarise([m for m in latest.values()]),
            "seconds_per_edit": mean(seconds),
            "per_edit": per_edit,
            "checkpoints": _checkpoints(rows, stats),
        }
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, sort_keys=True))
    return report


def _checkpoints(rows: list[dict], stats: list[dict]) -> list[dict]:
    """Each measurement point's summary, with the mean seconds per edit of the edits applied
    since the previous point (flat along a stream when an edit's cost does not grow)."""
    points, previous = [], 0
    for r in sorted(rows, key=lambda r: r["step"]):
        seconds = [s.get("seconds") for s in stats[previous: r["step"]] if s]
        points.append({"step": r["step"], "group": r["group"], "summary": summarise(list(r["items"].values())),
                       "measured": len(r["items"]), "seconds_per_edit": mean(seconds), "items": r["items"]})
        previous = r["step"]
    return points


def load_report(out: str | Path) -> dict[str, Any]:
    """report.json of a run directory; built from the run's files where it is missing."""
    out = Path(out)
    path = out / "report.json"
    if path.exists():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InvalidRequest(f"{path} is not valid JSON ({exc})") from None
    return build_report(out)


# ---- Markdown --------------------------------------------------------------------------
def _columns(report: dict) -> list[str]:
    rows = [report["baseline"]["summary"]] + [m["summary"] for m in report["methods"].values()]
    return [k for k in METRICS if any(r.get(k) is not None for r in rows)]


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def markdown(report: dict) -> str:
    cols = _columns(report)
    lines = [f"# editkit evaluation: {report['suite']}, protocol `{report['protocol']}`", ""]
    proto = f"**Protocol** `{report['protocol']}`: {report['protocol_description']}"
    if report.get("every"):
        proto += f" (k = {report['every']})"
    if report.get("group_size"):
        proto += f" (G = {report['group_size']})"
    if report.get("turn_size", 1) > 1:
        proto += f"; edits applied in turns of {report['turn_size']}"
    if report.get("sample"):
        proto += f"; each measurement point measures a fixed random sample of {report['sample']} edits (seed " \
                 f"{report['seed']}) among those made so far; the unedited row, the " \
                 f"{report['baseline'].get('records', report['edits'])} records some point measures"
    lines += [proto + ".", "",
              f"Model `{report['model']}` (fingerprint {report['fingerprint']}); {report['edits']} edits from "
              f"`{report['data'] or report['suite']}` ({report['select']} selection, seed {report['seed']}).", ""]
    if report["skipped"]:
        lines += [f"Skipped {len(report['skipped'])} invalid record(s) of {report['records_read']} read.", ""]
    head = ["method"] + [METRIC_LABELS[c] for c in cols] + ["s/edit", "edits"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| unedited | " + " | ".join(_fmt(report["baseline"]["summary"].get(c)) for c in cols)
                 + " | – | 0 |")
    for name, m in report["methods"].items():
        sec = "–" if m["seconds_per_edit"] is None else f"{m['seconds_per_edit']:.2f}"
        done = f"{m['edits_applied']}" + ("" if m["complete"] else " (incomplete)")
        lines.append(f"| {name} | " + " | ".join(_fmt(m["summary"].get(c)) for c in cols) + f" | {sec} | {done} |")
    lines += ["", "Definitions:", ""]
    lines += [f"- **TF** — {DEFINITIONS['tf']}.", f"- **EM** — {DEFINITIONS['em']}.",
              f"- **Loc unchanged (TF)** — {DEFINITIONS['loc_tf']}.",
              f"- **Loc unchanged (EM)** — {DEFINITIONS['loc_em']}.",
              f"- **Loc acc** — {DEFINITIONS['loc_acc']}.",
              "- Rel: the edit prompt; Gen: its rephrasings; Port: portability questions (where the data has them); "
              "s/edit: mean wall seconds to apply one edit.", ""]
    if report["protocol"] in ("retention", "groups", "immediate") or report.get("at"):
        lines += [f"## Figures at each measurement point ({report['protocol']})", ""]
        key = ["rel_tf", "rel_em", "gen_tf", "gen_em", "loc_tf", "loc_em"]
        if report["protocol"] == "immediate":
            lines += ["Running means of the right-after-edit figures.", ""]
        if report.get("at"):
            lines += ["After T edits of one stream, the first T edits measured (exactly a T-edit run); "
                      "s/edit: mean over the edits applied since the previous point.", ""]
        head = ["method", "edits"] + [METRIC_LABELS[k] for k in key] + ["s/edit"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, m in report["methods"].items():
            seconds = {cp["step"]: cp.get("seconds_per_edit") for cp in m["checkpoints"]}
            for step, summary in _curve(report, m):
                sec = seconds.get(step)
                lines.append(f"| {name} | {step} | " + " | ".join(_fmt(summary.get(k)) for k in key)
                             + f" | {'–' if sec is None else f'{sec:.2f}'} |")
        lines.append("")
    return "\n".join(lines)


def _curve(report: dict, m: dict, thin: bool = True) -> list[tuple[int, dict]]:
    """(number of edits, summary) points for plots and the per-point table."""
    cps = m["checkpoints"]
    if report["protocol"] == "immediate":
        rows, points = [], []
        for cp in cps:
            rows += list(cp["items"].values())
            points.append((cp["step"], summarise(rows)))
        return _thin(points) if thin else points
    if report["protocol"] == "groups":
        rows, points = [], []
        for cp in cps:
            rows += list(cp["items"].values())
            points.append((cp["step"], summarise(rows)))
        return points
    return [(cp["step"], cp["summary"]) for cp in cps]


def _thin(points: list, most: int = 20) -> list:
    if len(points) <= most:
        return points
    step = len(points) / most
    keep = sorted({int(k * step) for k in range(most)} | {len(points) - 1})
    return [points[k] for k in keep]


# ---- plots -----------------------------------------------------------------------------
def write_plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    panels = [("rel", "Reliability"), ("gen", "Generalization"), ("loc", "Locality (unchanged)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        for k, (name, m) in enumerate(report["methods"].items()):
            points = _curve(report, m, thin=False)
            color = f"C{k}"
            for suffix, style in (("tf", "-"), ("em", "--")):
                xs = [s for s, summ in points if summ.get(f"{key}_{suffix}") is not None]
                ys = [summ[f"{key}_{suffix}"] for s, summ in points if summ.get(f"{key}_{suffix}") is not None]
                if xs:
                    ax.plot(xs, ys, style, marker="o", markersize=3, color=color,
                            label=f"{name} ({suffix.upper()})")
        before = report["baseline"]["summary"]
        for suffix, style in (("tf", ":"), ("em", "-.")):
            if before.get(f"{key}_{suffix}") is not None and key != "loc":
                ax.axhline(before[f"{key}_{suffix}"], linestyle=style, color="grey", linewidth=1,
                           label=f"unedited ({suffix.upper()})")
        ax.set_title(title)
        ax.set_xlabel("number of edits")
        if report.get("at"):
            ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{report['suite']} — protocol {report['protocol']} "
                 f"(TF: teacher-forced, EM: generated exact match)", fontsize=10)
    fig.tight_layout()
    path = out / "metrics_vs_edits.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    if report["protocol"] == "retention":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for k, (name, m) in enumerate(report["methods"].items()):
            by_age: dict[int, list[dict]] = {}
            for cp in m["checkpoints"]:
                for i, metrics in cp["items"].items():
                    by_age.setdefault(cp["step"] - (int(i) + 1), []).append(metrics)
            ages = sorted(by_age)
            for ax, suffix in zip(axes, ("tf", "em")):
                ys = [summarise(by_age[a])[f"rel_{suffix}"] for a in ages]
                ax.plot(ages, ys, marker="o", markersize=3, color=f"C{k}", label=name)
        for ax, suffix in zip(axes, ("TF", "EM")):
            ax.set_title(f"Retention: reliability ({suffix}) by edits made since")
            ax.set_xlabel("edits applied after the measured edit")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("reliability")
        axes[-1].legend(fontsize=8)
        fig.tight_layout()
        path = out / "retention.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def per_edit_csv(report: dict) -> str:
    """One row per method and edit: the edit, its figures (both definitions) and its statistics."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "edit", "record", "prompt", "target_new", *METRICS, "seconds", "steps"])
    for name, m in report["methods"].items():
        for e in m["per_edit"]:
            metrics, stats = e["metrics"] or {}, e["stats"] or {}
            writer.writerow([name, e["edit"], e["record"], e["prompt"], e["target_new"],
                             *("" if metrics.get(k) is None else f"{metrics[k]:.6g}" for k in METRICS),
                             stats.get("seconds", ""), stats.get("steps", "")])
    return buffer.getvalue()


def render_report(report: dict, out: str | Path, plots: bool = True) -> list[Path]:
    """Write report.json, report.md, per_edit.csv and (with plots) the PNGs into `out`; return
    the paths."""
    out = Path(out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1, sort_keys=True))
    atomic_write_text(out / "report.md", markdown(report))
    atomic_write_text(out / "per_edit.csv", per_edit_csv(report))
    paths = [out / "report.json", out / "report.md", out / "per_edit.csv"]
    if plots:
        paths += write_plots(report, out)
    return paths
