"""The run report: ``eep report RUN_DIR`` writes ``report.md``, ``fitness.png`` and ``methods.png``.

It reads only what the run directory holds: the journal (every evaluation), ``summary.json``
(held-out scores, written when the search ends; absent or without them while it runs) and, when
present, ``baselines.json``, other compression methods scored on the same held-out split::

    {"keep": 4, "num_experts": 8, "num_layers": 4, "top_k": 2,
     "methods": {"full": {"heldout": 99.1, "tasks": {"copy": 100.0}, "kept_params": 27000000,
                          "active_params": 9000000},
                 "random": {"heldout": 51.2, "heldout_std": 6.3, "draws": 5, ...},
                 "naee": {..., "how": "enumeration"}, "search": {...}},
     "sweep": {"2": {"random": 20.1, "naee": 40.2}, "6": {...}}}

``sweep`` holds held-out scores at other numbers of kept experts. Method names are free; the
known ones are listed in a fixed order, others after them. The tables are built by pure
functions (:func:`method_rows`, :func:`comparison_table`) so they are tested without plotting.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eep.errors import EepError
from eep.journal import Evaluation, RunDir, warm_seed_name
from eep.loop import best_of, random_initial
from eep.methods import method_of

METHOD_ORDER = (
    "full",
    "random",
    "frequency",
    "reap",
    "naee",
    "naee+skip",
    "moei2",
    "moei2+low-rank",
    "greedy",
    "search",
)
WINDOW = 20  # evaluations in the population-trend mean of fitness.png
_COLORS = {
    "random": "tab:gray",
    "frequency": "tab:blue",
    "reap": "tab:purple",
    "naee": "tab:green",
    "naee+skip": "tab:olive",
    "moei2": "tab:cyan",
    "moei2+low-rank": "tab:orange",
    "greedy": "tab:brown",
    "search": "tab:red",
}
_MARKERS = {
    "random": "o",
    "frequency": "s",
    "reap": "D",
    "naee": "^",
    "naee+skip": "v",
    "moei2": "P",
    "moei2+low-rank": "X",
    "greedy": "h",
}
_SPARE_COLORS = ("tab:pink", "gold", "navy", "teal", "black")
_DASH = "–"


@dataclass(frozen=True)
class Row:
    """One method's line of the comparison table."""

    method: str
    heldout: float | None
    tasks: dict[str, float] = field(default_factory=dict)
    heldout_std: float | None = None
    draws: int | None = None
    kept_params: int | None = None
    active_params: int | None = None
    how: str | None = None
    evaluations: int | None = None
    """Fitness evaluations the method spent (the search; greedy elimination)."""
    warm_start: tuple[str, ...] = ()
    """The search's row: the baselines it started from."""

    @property
    def label(self) -> str:
        notes = [self.how] if self.how else []
        if self.evaluations is not None:
            notes.append(f"{self.evaluations} evaluations")
        if self.heldout_std is not None:
            notes.append(f"mean ± std of {self.draws} draws" if self.draws else "mean ± std")
        return f"{self.method} ({', '.join(notes)})" if notes else self.method


# -- pure helpers -------------------------------------------------------------------------------


def ordered_methods(names) -> list[str]:
    """Known methods in :data:`METHOD_ORDER`, then the others in the order given."""
    names = list(names)
    return [m for m in METHOD_ORDER if m in names] + [m for m in names if m not in METHOD_ORDER]


def method_rows(
    baselines: dict[str, Any] | None,
    heldout: dict[str, Any] | None = None,
    more: dict[str, dict] | None = None,
) -> list[Row]:
    """The table's rows: every method of ``baselines``, plus the full model and the search from
    ``summary.json``'s ``heldout`` block (``{"best": ..., "full": ...}``) and the rows ``more``
    (``{method: {"heldout", "tasks", ...}}``) where the baselines lack them."""
    methods = dict((baselines or {}).get("methods", {}))
    for method, row in (more or {}).items():
        methods.setdefault(method, row)
    for method, key in (("full", "full"), ("search", "best")):
        if method not in methods and heldout and key in heldout:
            methods[method] = {"heldout": heldout[key]["mean"], "tasks": heldout[key]["scores"]}
    return [
        Row(
            m,
            methods[m]["heldout"],
            dict(methods[m].get("tasks", {})),
            methods[m].get("heldout_std"),
            methods[m].get("draws"),
            methods[m].get("kept_params"),
            methods[m].get("active_params"),
            methods[m].get("how"),
            methods[m].get("evaluations"),
            tuple(methods[m].get("warm_start", ())),
        )
        for m in ordered_methods(methods)
    ]


def best_compressed(rows: Sequence[Row]) -> Row | None:
    """The compressed method (any but ``full``) with the highest held-out mean; on ties the one
    keeping fewer parameters, then the first."""
    scored = [r for r in rows if r.method != "full" and r.heldout is not None]
    if not scored:
        return None
    top = max(r.heldout for r in scored)
    tied = [r for r in scored if r.heldout == top]
    # min keeps the first of equals; a row without a count loses a tie to one with
    return min(tied, key=lambda r: math.inf if r.kept_params is None else r.kept_params)


WARM_STARTS = ("greedy", "naee", "reap", "frequency")
"""Baselines ``search.warm_start`` can start a search from."""


def search_behind(rows: Sequence[Row], validated: bool = False) -> str | None:
    """A line saying so when a baseline beats the search held out, and what may close the gap; None
    when the search is at least as good (or either is missing). ``validated``: the run already picks
    its export by validation examples."""
    search = next((r for r in rows if r.method == "search" and r.heldout is not None), None)
    winner = best_compressed(rows)
    if search is None or winner is None or winner.heldout <= search.heldout:
        return None
    from eep.evolution import FRONTIER_PICK

    frontier = (search.how or "").startswith(FRONTIER_PICK)  # which takes no warm start
    tips = ["more evaluations (`search.evaluations`)"]
    if not validated:
        tips.append(
            "validation examples to pick the export by (`fitness.tasks[].validation_size` above 0)"
        )
    if winner.method in WARM_STARTS and winner.method not in search.warm_start and not frontier:
        tips.insert(0, f"starting from it (`search.warm_start: [{winner.method}]`)")
    how = f"{', '.join(tips[:-1])} or {tips[-1]}" if len(tips) > 1 else tips[0]
    return (
        f"The search ({search.heldout:.1f}) is {winner.heldout - search.heldout:.1f} points below "
        f"{winner.method} held out; {how} may close the gap."
    )


def human_count(n: int | None) -> str:
    """``13_200_000`` -> ``13.2M``."""
    if n is None:
        return _DASH
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if abs(value) >= 100 else f"{value:.1f}{unit}"
    return str(n)


def _params(n: int | None, full: int | None, is_full: bool) -> str:
    if n is None or not full or is_full:
        return human_count(n)
    return f"{human_count(n)} ({100 * n / full:.0f} %)"


def comparison_table(rows: Sequence[Row], tasks: Sequence[str]) -> list[str]:
    """Markdown lines: one row per method, one column per task that some method has a score for,
    then the held-out mean (the best compressed method's in bold) and parameter counts, relative
    to the full model when known."""
    tasks = [t for t in tasks if any(t in r.tasks for r in rows)]
    full = next((r for r in rows if r.method == "full"), None)
    best = best_compressed(rows)
    with_params = any(r.kept_params is not None or r.active_params is not None for r in rows)
    # active parameters only where a method routes to fewer experts than the full model
    with_active = (
        with_params and len({r.active_params for r in rows if r.active_params is not None}) > 1
    )
    header = (
        ["method", *tasks, "held-out mean"]
        + (["kept params"] if with_params else [])
        + (["active params / token"] if with_active else [])
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        mean = _DASH if row.heldout is None else f"{row.heldout:.1f}"
        if row.heldout_std is not None:
            mean += f" ± {row.heldout_std:.1f}"
        if row is best:
            mean = f"**{mean}**"
        cells = [
            row.label,
            *(f"{row.tasks[t]:.1f}" if t in row.tasks else _DASH for t in tasks),
            mean,
        ]
        if with_params:
            cells.append(_params(row.kept_params, full and full.kept_params, row is full))
        if with_active:
            cells.append(_params(row.active_params, full and full.active_params, row is full))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def running_best(fitnesses: Sequence[float | None]) -> list[float | None]:
    """Best fitness so far after each evaluation; failed ones (``None``) keep the previous best."""
    best, out = None, []
    for f in fitnesses:
        if f is not None and (best is None or f > best):
            best = f
        out.append(best)
    return out


def running_mean(values: Sequence[float], window: int = WINDOW) -> list[float]:
    """Mean of the last ``window`` values (fewer at the start) after each value."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def sweep_table(series: dict[str, dict[int, float]]) -> list[str]:
    """Markdown lines: a row per method, a column per number of experts kept (the plot's numbers)."""
    keeps = sorted({k for points in series.values() for k in points})
    lines = [
        "| method | " + " | ".join(f"{k} kept" for k in keeps) + " |",
        "|---|" + "---:|" * len(keeps),
    ]
    for method, points in series.items():
        lines.append(
            f"| {method} | "
            + " | ".join(f"{points[k]:.1f}" if k in points else _DASH for k in keeps)
            + " |"
        )
    return lines


def sweep_series(baselines: dict[str, Any], keep: int | None = None) -> dict[str, dict[int, float]]:
    """Held-out score by experts kept, per compressed method: the ``sweep`` entries plus each
    method's score at the main ``keep`` (default: the baselines' own), which wins over a sweep
    entry at the same keep."""
    series: dict[str, dict[int, float]] = {}
    for other, scores in baselines.get("sweep", {}).items():
        for method, score in scores.items():
            series.setdefault(method, {})[int(other)] = score
    keep = baselines.get("keep", keep)
    for method, data in baselines.get("methods", {}).items():
        if method != "full" and keep is not None:
            series.setdefault(method, {})[keep] = data["heldout"]
    return {m: dict(sorted(series[m].items())) for m in ordered_methods(series)}


def load_baselines(path: Path) -> dict[str, Any] | None:
    """``baselines.json``, checked enough that a malformed file fails naming what is wrong."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EepError(f"{path} is not valid JSON ({err})") from None

    def number(value) -> bool:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )

    if not isinstance(data, dict) or not isinstance(data.get("methods", {}), dict):
        raise EepError(f"{path}: expected an object with a 'methods' object (see eep/report.py)")
    for method, entry in data.get("methods", {}).items():
        if not isinstance(entry, dict) or not number(entry.get("heldout")):
            raise EepError(f"{path}: methods.{method}.heldout must be a number")
    sweep = data.get("sweep", {})
    if not isinstance(sweep, dict):
        raise EepError(f"{path}: 'sweep' must map a number of kept experts to {{method: score}}")
    for keep, scores in sweep.items():
        if (
            not str(keep).isdigit()
            or not isinstance(scores, dict)
            or not all(map(number, scores.values()))
        ):
            raise EepError(
                f"{path}: sweep.{keep} must be a number of kept experts mapping methods to scores"
            )
    return data


# -- figures ------------------------------------------------------------------------------------


def _figure(width: float = 8.5, height: float = 4.0):
    # A bare Figure renders with Agg on savefig and never touches pyplot's global state or a display.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _legend(ax) -> None:
    # Outside the axes, right: points and curves may lie anywhere, so inside it would hide some.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)


def plot_fitness(
    evaluations: Sequence[Evaluation],
    path: Path,
    title: str,
    phases: Sequence[tuple[int, str]] = (),
) -> None:
    """Every evaluation's fitness by candidate id, the running best and the population trend;
    candidates cut short at their upper bound; failed evaluations as red crosses on the bottom edge;
    ``phases`` as (id, label) markers."""
    from matplotlib.transforms import blended_transform_factory

    fig, ax = _figure()
    evaluations = sorted(evaluations, key=lambda e: e.id)
    ok = [e for e in evaluations if e.ok]
    ids = [e.id for e in evaluations]
    ax.scatter(
        [e.id for e in ok],
        [e.fitness for e in ok],
        s=12,
        color="tab:blue",
        alpha=0.45,
        linewidths=0,
        label="evaluation",
        zorder=2,
    )
    best = running_best([e.fitness for e in evaluations])
    ax.step(
        ids,
        [math.nan if b is None else b for b in best],
        where="post",
        color="tab:red",
        linewidth=2,
        label="best so far",
        zorder=3,
    )
    ax.plot(
        [e.id for e in ok],
        running_mean([e.fitness for e in ok]),
        color="tab:green",
        linewidth=1.5,
        label=f"mean of last {WINDOW}",
        zorder=3,
    )
    top = best_of(evaluations)
    if top is not None:
        ax.scatter(
            [top.id],
            [top.fitness],
            marker="*",
            s=160,
            color="tab:red",
            edgecolors="black",
            linewidths=0.6,
            label=f"best: {top.fitness:.1f} (candidate {top.id})",
            zorder=4,
        )
    cut = [e for e in evaluations if e.cut is not None]
    if cut:  # scored part-way: their bound, an upper limit on what they would have scored
        ax.scatter(
            [e.id for e in cut],
            [e.cut for e in cut],
            s=10,
            marker="v",
            color="0.6",
            alpha=0.6,
            linewidths=0,
            label=f"cut short, at most ({len(cut)})",
            zorder=2,
        )
    failed = [e.id for e in evaluations if e.failed]
    if failed:
        edge = blended_transform_factory(ax.transData, ax.transAxes)
        ax.scatter(
            failed,
            [0.02] * len(failed),
            transform=edge,
            marker="x",
            s=20,
            color="tab:red",
            label=f"failed ({len(failed)})",
            zorder=3,
            clip_on=False,
        )
    for start, label in phases:
        if ids and ids[0] < start <= ids[-1]:
            ax.axvline(start - 0.5, color="0.4", linestyle=":", linewidth=1)
            ax.annotate(
                label,
                (start - 0.5, 1),
                xycoords=("data", "axes fraction"),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
                color="0.3",
            )
    ax.set_xlabel("candidate id (evaluation order)")
    ax.set_ylabel("fitness (search split)")
    ax.set_title(title, pad=14 if phases else 6)
    _legend(ax)
    fig.savefig(path)


def plot_methods(
    baselines: dict[str, Any], path: Path, title: str, keep: int | None = None
) -> None:
    """Held-out score against experts kept per layer: a line per method, the search as stars, the
    random draws' spread as an error bar, the full model as a dashed line."""
    fig, ax = _figure()
    methods = baselines.get("methods", {})
    spare = iter(_SPARE_COLORS * 4)
    keep = baselines.get("keep", keep)
    keeps: set[int] = set()
    for method, points in sweep_series(baselines, keep).items():
        color = _COLORS.get(method) or next(spare)
        keeps.update(points)
        std = methods.get(method, {}).get("heldout_std") if keep in points else None
        if method == "search":
            style = dict(
                marker="*",
                markersize=14,
                markeredgecolor="black",
                markeredgewidth=0.6,
                zorder=4,
                linewidth=1.5 if len(points) > 1 else 0,
            )
        else:  # a marker of its own, and dashed where it may hide under another (naee+skip over naee)
            style = dict(
                marker=_MARKERS.get(method, "o"),
                markersize=6,
                linewidth=1.5,
                zorder=3,
                linestyle="--" if method.endswith("+skip") else "-",
            )
        ax.plot(
            list(points),
            list(points.values()),
            color=color,
            label=f"{method} (± std at {keep})" if std else method,
            **style,
        )
        if std:
            ax.errorbar(
                [keep], [points[keep]], yerr=[std], color=color, capsize=4, linewidth=1, zorder=3
            )
    full = methods.get("full")
    experts = baselines.get("num_experts")
    if full is not None:
        ax.axhline(
            full["heldout"],
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"full model ({experts} experts)" if experts else "full model",
        )
    if keeps:
        ax.set_xticks(
            sorted(keeps), [f"{k}\n(this run)" if k == keep else str(k) for k in sorted(keeps)]
        )
        ax.set_xlim(min(keeps) - 0.5, max(keeps) + 0.5)
    ax.set_xlabel(
        f"experts kept per MoE layer (of {experts})" if experts else "experts kept per MoE layer"
    )
    ax.set_ylabel("held-out score (mean over tasks)")
    ax.set_title(title)
    _legend(ax)
    fig.savefig(path)


def _level(share: float, front: Sequence[dict]) -> str:
    """What a latency pick's time is: a front point's, a 5 % step of the full model's, or its."""
    if share == 1.0:
        return "the full model's"
    if any(p["latency"] == share for p in front):
        return "a front point's"
    return f"{round(100 * share)} %"


def _noise(summary: dict) -> str:
    """What the full model timed against itself at the end of a latency frontier says of a share's
    noise, and how many neighbouring front points are closer than it."""
    shares = summary.get("latency_noise")
    if not shares:
        return "Times measured on a busy machine vary."
    low, high = min(shares), max(shares)
    shares = [p["latency"] for p in summary["front"]]
    close = sum(b - a < high - low for a, b in zip(shares, shares[1:]))
    return (
        f"Timed against itself {len(summary['latency_noise'])} times at the end, the full model "
        f"took {100 * low:.1f}–{100 * high:.1f} % of its own time: shares less than "
        f"{100 * (high - low):.1f} points apart are within one measurement's noise here"
        + (
            f", as {close} of the {len(shares) - 1} steps between neighbouring front points are."
            if close
            else "; no two neighbouring front points are that close."
        )
    )


def baseline_points(
    baselines: dict[str, Any] | None,
    uniform_params: dict[int, int],
    objective: str,
    full_latency: float | None = None,
) -> dict[str, list[tuple[float, float]]]:
    """Each baseline's (size, held-out) points on a frontier plot's axis: at its uniform keep
    counts (``uniform_params``: their kept parameters), or for a latency frontier at the share of
    the full model's time ``eep baselines`` measured for it, in milliseconds of the search's
    ``full_latency`` (as the front's points are shown)."""
    if not baselines:
        return {}
    if objective != "latency":
        return {
            method: [(uniform_params[k], v) for k, v in points.items() if k in uniform_params]
            for method, points in sweep_series(baselines).items()
            if method not in ("search", "full")
        }
    found: dict[str, list[tuple[float, float]]] = {}
    for rows in [baselines.get("methods", {}), *baselines.get("sweep_rows", {}).values()]:
        for method, row in rows.items():
            if method not in ("search", "full") and row.get("latency") is not None:
                found.setdefault(method, []).append((full_latency * row["latency"], row["heldout"]))
    return {m: sorted(found[m]) for m in ordered_methods(found)}


def latency_against(front: Sequence[dict], points: dict[str, list[tuple[float, float]]]) -> str:
    """Whether every baseline point of a latency frontier's plot is dominated held out (``front``:
    the front's points and picks; one at most as slow that scores at least as much), or which are
    not."""
    free = [
        f"{method} {score:.2f} at {time:.3f} ms"
        for method, found in points.items()
        for time, score in found
        if not any(p["latency_ms"] <= time and p["heldout"]["mean"] >= score for p in front)
    ]
    if free:
        return "Not dominated held out by a front point or a pick: " + "; ".join(free) + "."
    return (
        "Every baseline point is dominated held out: a front point or a pick at most as slow "
        "scores at least as much."
    )


def plot_frontier(
    front: Sequence[dict],
    picks: Sequence[dict],
    baselines: dict[str, list[tuple[float, float]]],
    full: tuple[float, float | None],
    path: Path,
    title: str,
    objective: str = "kept_params",
) -> None:
    """Held-out score (and search fitness) against kept (or active) parameters, or latency: the
    frontier's points as a step line, the pick at each uniform size, each baseline's points
    (:func:`baseline_points`), the full model as a star."""
    fig, ax = _figure()
    key = "latency_ms" if objective == "latency" else objective  # a share is shown in ms
    params = [p[key] for p in front]
    ax.step(
        params,
        [p["heldout"]["mean"] for p in front],
        where="post",
        color="tab:red",
        marker="*",
        markersize=11,
        markeredgecolor="black",
        markeredgewidth=0.5,
        zorder=4,
        label="frontier (held-out)",
    )
    ax.plot(
        params,
        [p["fitness"] for p in front],
        color="tab:red",
        linestyle=":",
        marker=".",
        linewidth=1,
        label="frontier (search fitness)",
    )
    if picks:
        ax.plot(
            [p[key] for p in picks],
            [p["heldout"]["mean"] for p in picks],
            linestyle="none",
            marker="D",
            markersize=6,
            markerfacecolor="none",
            color="tab:red",
            label=f"pick per {'time' if objective == 'latency' else 'size'} (held-out)",
        )
    spare = iter(_SPARE_COLORS * 4)
    for method, points in baselines.items():
        ax.plot(
            [x for x, _ in points],
            [y for _, y in points],
            linestyle="none",
            marker=_MARKERS.get(method, "o"),
            markersize=6,
            color=_COLORS.get(method) or next(spare),
            label=method,
        )
    if full[1] is not None:
        ax.plot(
            [full[0]],
            [full[1]],
            marker="*",
            color="black",
            markersize=12,
            linestyle="none",
            label="full model",
        )
    ax.set_xlabel(
        {
            "kept_params": "parameters kept",
            "active_params": "parameters active per token",
            "latency": "milliseconds a forward pass (measured)",
        }[objective]
    )
    ax.set_ylabel("score (mean over tasks)")
    ax.set_title(title)
    _legend(ax)
    fig.savefig(path)


def frontier_against(picks: dict, baselines: dict) -> str:
    """Whether a kept-parameters frontier's picks (by experts a layer) score at least the best
    baseline held out at each size the baselines were scored at, or where they fall behind."""
    series = {m: s for m, s in sweep_series(baselines).items() if m != "search"}
    behind, sizes = [], []
    for size in sorted({k for s in series.values() for k in s}):
        rivals = {m: s[size] for m, s in series.items() if size in s}
        if str(size) not in picks:
            continue
        sizes.append(str(size))
        method, best = max(rivals.items(), key=lambda kv: kv[1])
        pick = picks[str(size)]["heldout"]["mean"]
        if best > pick:
            behind.append(f"{method} {best:.2f} against {pick:.2f} at {size} experts a layer")
    if behind:
        return "Behind a baseline held out: " + "; ".join(behind) + "."
    return (
        f"At every size the baselines were scored at ({', '.join(sizes)} experts a layer), the "
        "frontier's pick scores at least the best of them held out."
    )


def _frontier_lines(summary: dict, config, baselines, path: Path) -> list[str]:
    """A multi-objective run's frontier: its points, its hypervolume, the plot against baselines."""
    from eep.evolution import RETIMES
    from eep.genome import Genome
    from eep.surgery import size_model

    front, full_params = summary["front"], summary["full_params"]
    objective = summary.get("objective", "kept_params")
    active, timed = objective == "active_params", objective == "latency"
    what = (
        "measured ms a forward pass"
        if timed
        else "parameters active per token"
        if active
        else "parameters kept"
    )
    count = (
        "experts kept / top-k (per layer)"
        if timed
        else "experts active per token (top-k per layer)"
        if active
        else "experts kept (per layer)"
    )
    full = 1.0 if timed else full_params  # a latency is a share of the full model's time

    def experts(p: dict) -> str:
        genome = Genome.from_dict(p["genome"])
        if timed:
            return "/".join(f"{len(genome.keep(i))}:{genome.active(i)}" for i, _ in genome.layers)
        if active:
            return f"{p['active_experts']} ({'/'.join(str(genome.active(i)) for i, _ in genome.layers)})"
        return (
            f"{p['kept_experts']} ({'/'.join(str(len(genome.keep(i))) for i, _ in genome.layers)})"
        )

    def size(p: dict) -> str:  # times to the thousandth, as --max-latency compares them
        return f"{p['latency_ms']:.3f}" if timed else f"{p[objective]:,}"

    lines = [
        "",
        "## Frontier",
        "",
        f"- {len(front)} non-dominated points (search fitness vs {what}); hypervolume of the "
        f"held-out front: **{summary['hypervolume']:.4f}** (the share of the square of accuracy "
        f"0–100 by {'latency' if timed else 'parameters'} 0–full that it dominates; 1 = 100 % at "
        f"no {'time' if timed else 'parameters'})",
        "- export one: `eep export RUN_DIR --point ID --out DIR`, or "
        + (
            "`--max-latency MS` for the pick within the largest time of the second table that is "
            "at most MS (times compare to the thousandth)"
            if timed
            else "`--max-params N` for the pick of the largest size within N (the second table)"
        ),
    ]
    if timed:
        lines.append(
            f"- latency: the fastest of {config.search.latency_repeats} forward passes of one batch "
            f"of {config.fitness.batch_size} search prompts, measured per candidate on its worker "
            f"({summary.get('experts_implementation', 'its experts implementation')}) as a share "
            "of the full model's time, timed just before and after it (the machine's speed "
            "drifts; a share taken within seconds does not); shown as milliseconds of the full "
            f"model's time at the end, {summary['full_latency']:.3f} ms. "
            + (
                f"The {len(summary['latency_retimed'])} candidates that stood on the front were timed "
                f"{RETIMES} more times at the end, each keeping the median of its shares, and "
                "the front was drawn again. "
                if summary.get("latency_retimed")
                else ""
            )
            + _noise(summary)
        )
    lines += [
        "",
        f"| candidate | {count} | {what} | search fitness | held-out |",
        "|---|---|---|---|---|",
    ]
    for p in front:
        lines.append(
            f"| {p['id']} | {experts(p)} | {size(p)} "
            f"({100 * p[objective] / full:.1f} %) | {p['fitness']:.2f} | "
            f"{p['heldout']['mean']:.2f} |"
        )
    picks = summary.get("picks") or {}
    if picks:
        lines += [
            "",
            (
                "What `--max-latency` exports within each front point's time, every 5 % of the "
                "full model's time above them, and the full model's: the pick within it (the best "
                "on the validation examples among the best few by search fitness measured at most "
                "that time; without validation examples, the best by search fitness):"
                if timed
                else "What `--max-params` exports at each uniform size: the pick within it (the "
                "best on the validation examples among the best few by search fitness of at most "
                "that size; without validation examples, the best by search fitness):"
            ),
            "",
            f"| {'within' if timed else 'size'} | candidate | {count} | {what} | search fitness "
            "| validation | held-out |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, p in picks.items():
            validation = "–" if p.get("validation") is None else f"{p['validation']:.2f}"
            within = (
                f"{p['within_ms']:.3f} ms ({_level(p['within'], front)})"
                if timed
                else f"top-{key} per layer"
                if active
                else f"{key} per layer"
            )
            lines.append(
                f"| {within} | {p['id']} | {experts(p)} | {size(p)} | {p['fitness']:.2f} | "
                f"{validation} | {p['heldout']['mean']:.2f} |"
            )
        if baselines and not (active or timed):
            lines += ["", frontier_against(picks, baselines)]
    sizes = size_model(config.model)
    first = Genome.from_dict(front[0]["genome"])
    layers = [i for i, _ in first.layers]
    uniform = (  # where the baselines' uniform keep counts sit (kept parameters only)
        {}
        if active or timed
        else {
            k: sizes(
                Genome.from_keep(first.num_experts, first.top_k, {i: range(k) for i in layers})
            )[0]
            for k in range(first.top_k, first.num_experts + 1)
        }
    )
    full_score = ((summary.get("heldout") or {}).get("full") or {}).get("mean")
    points = baseline_points(baselines, uniform, objective, summary.get("full_latency"))
    if timed and points:
        lines += ["", latency_against([*front, *picks.values()], points)]
    plot_frontier(
        front,
        list(picks.values()),
        points,
        (summary["full_latency"] if timed else full_params, full_score),
        path,
        f"{config.name}: the accuracy-{'latency' if timed else 'size'} frontier",
        objective,
    )
    return [*lines, "", f"![the accuracy-{'latency' if timed else 'size'} frontier](frontier.png)"]


# -- the report ---------------------------------------------------------------------------------


def _stale_search_row(baselines: dict | None, summary: dict | None) -> str | None:
    """A line saying so when ``baselines.json``'s search row is of fewer evaluations than the run
    has now (it was resumed with a larger budget after ``eep baselines``); None when it is not."""
    row = (baselines or {}).get("methods", {}).get("search")
    if not row or not summary or "evaluations" not in row:
        return None
    if row["evaluations"] == summary["evaluations"]:
        return None
    return (
        f"baselines.json was written when the run had {row['evaluations']} evaluations; it has "
        f"{summary['evaluations']} now, so the search row is the run's current pick "
        "(`eep baselines` again to score the baselines beside it afresh)."
    )


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` (and its figures) into ``run_dir``; returns the path of ``report.md``."""
    run = RunDir.open(run_dir)
    config = run.config()
    evaluations = run.evaluations()
    summary = json.loads(run.summary_path.read_text()) if run.summary_path.exists() else None
    heldout = (summary or {}).get("heldout") or None
    baselines = load_baselines(run.path / "baselines.json")
    stale = _stale_search_row(baselines, summary)
    if stale:  # the run went on after `eep baselines`: its row is the run's pick now, below
        methods = {m: v for m, v in baselines["methods"].items() if m != "search"}
        baselines = {**baselines, "methods": methods}
    fitness_png, methods_png = run.path / "fitness.png", run.path / "methods.png"

    model = "" if config.model.path == config.name else f" ({config.model.path})"
    lines = [
        f"# eep report: {config.name}{model}",
        "",
        f"- search space: {_space(config, evaluations)}"
        if method_of(config).searches
        else f"- size: {config.search_space.keep} experts' worth of parameters per MoE layer "
        "(MoE-I²: stage 1 keeps a number per layer, below)",
    ]
    if summary is None:
        lines.append(
            "- **the search has not finished** (no summary.json yet): this report is built from the "
            "journal alone and has no held-out scores"
        )
    elif heldout is None:
        lines.append(
            "- **the search has not finished** (summary.json has no held-out scores yet): "
            "held-out comparisons are missing"
        )

    # MoE-I² runs show their stages where EEP's show the search
    moei2 = summary is not None and not method_of(config).searches
    more = None
    if moei2:  # no search of EEP's in this run: MoE-I²'s stages instead
        lines += ["", "## MoE-I²", "", *_moei2_lines(summary, config)]
        more = {
            f"moei2 {name.replace('stage', 'stage ')}": {
                "heldout": s["heldout"]["mean"],
                "tasks": s["heldout"]["scores"],
                "kept_params": s["heldout"].get("kept_params"),
                "active_params": s["heldout"].get("active_params"),
            }
            for name, s in summary["stages"].items()
        }
        heldout = {"full": heldout["full"]} if heldout else None
    else:
        lines += ["", "## Search", ""]
    best = best_of(evaluations)
    failed = sum(e.failed for e in evaluations)
    cut = sum(e.cut is not None for e in evaluations)
    if not moei2:
        lines.append(
            f"- evaluations: {len(evaluations)} of {config.search.evaluations}, {failed} failed"
            + (
                f", {cut} cut short as hopeless (scored part-way; never a parent or the best)"
                if cut
                else ""
            )
        )
        seeded = _seeds_line(config)
        if seeded:
            lines.append(seeded)
    if best is not None:
        lines.append(
            f"- best search fitness: {best.fitness:.2f} (candidate {best.id}, genome `{best.genome.key}`)"
        )
    frontier = bool(summary and summary.get("front"))
    chosen = (summary or {}).get("selected")
    if frontier and summary.get("objective") == "latency":
        lines.append(
            "- a latency frontier: `eep export RUN_DIR --point ID` or `--max-latency MS` writes one "
            "of its points (listed below)"
        )
    elif frontier:
        lines.append(
            "- a frontier: `eep export RUN_DIR --point ID` or `--max-params N` writes one of its "
            "points (listed below, with a pick per size)"
        )
    elif chosen and chosen.get("by") == "validation" and not moei2:
        from eep.evolution import start_name

        starts = chosen.get("starts") or {}
        lines.append(
            f"- exported: candidate {chosen['id']} (search fitness {chosen['fitness']:.2f})"
            + (f", {start_name(chosen)}" if start_name(chosen) else "")
            + f", the best on the validation examples ({chosen['validation']:.2f}) among the "
            f"{chosen.get('top', len(chosen['candidates']))} best by search fitness"
            + _starts_judged(starts, chosen["candidates"])
        )
    if heldout and "best" in heldout and not moei2 and not frontier:
        lines.append(f"- held-out score of the exported genome: {heldout['best']['mean']:.2f}")
    if summary and summary.get("generalisation_gap") is not None and not moei2 and not frontier:
        lines.append(
            f"- generalisation gap (its search fitness minus held-out): {summary['generalisation_gap']:.2f} "
            "points"
        )
    if evaluations:
        phases = [(_breeding_starts(config, evaluations), "breeding starts")]
        if config.search_space.kind == "merge":
            phases.append((config.search_space.merge_after, "merging starts"))
        plot_fitness(
            evaluations,
            fitness_png,
            f"{config.name}: fitness over {len(evaluations)} evaluations",
            phases,
        )
        lines += ["", "![fitness over evaluations](fitness.png)"]
    else:
        fitness_png.unlink(missing_ok=True)

    # a frontier spans every size: it has one only beside baselines (search_space.keep is unset)
    keep = (baselines or {}).get("keep") or (None if frontier else config.search_space.keep)
    point = None
    if frontier:  # beside the baselines: the frontier's pick at their size, if it has one
        from eep.evolution import compared

        point = compared(summary, keep)
        heldout = {
            "full": heldout["full"],
            **({"best": point["heldout"]} if point else {}),
        }
    rows = method_rows(baselines, heldout, more)
    lines += ["", "## Held-out comparison", ""]
    if stale:
        lines += [stale, ""]
    if rows:
        tasks = list(
            dict.fromkeys(
                [t.name for t in config.fitness.tasks] + [t for r in rows for t in r.tasks]
            )
        )
        experts = (baselines or {}).get("num_experts") or (
            best.genome.num_experts if best else None
        )
        if keep and moei2 and not baselines:
            lines += [
                f"MoE-I² stage 2 keeps {keep} experts' worth of parameters per MoE layer; stage 1 alone keeps "
                "the experts listed above. Scores are on the held-out split.",
                "",
            ]
        elif keep:
            lines += [
                f"Compressed methods keep {keep}"
                + (f" of {experts}" if experts else "")
                + " experts per MoE layer"
                + (" (MoE-I² stage 2: that many experts' worth of parameters)" if moei2 else "")
                + (
                    f"; the search row is the frontier's pick at that size (candidate {point['id']}, "
                    f"{point['kept_experts']} experts kept)"
                    if point
                    else ""
                )
                + ". Scores are on the held-out split.",
                "",
            ]
        lines += comparison_table(rows, tasks)
        counted = _heldout_counts(config)
        lines += ["", counted] if counted else []
        # a latency frontier has no row at the baselines' size: it meets them by time (below)
        timed = frontier and summary.get("objective") == "latency"
        winner = None if timed else best_compressed(rows)
        full = next((r for r in rows if r.method == "full"), None)
        if timed and baselines:
            lines += [
                "",
                "A latency frontier has no pick at the baselines' size: the Frontier section sets "
                "each baseline beside the front by its measured time.",
            ]
        if winner is not None:
            lines += [
                "",
                f"**Best compressed method: {winner.method}**, held-out {winner.heldout:.1f}"
                f"{_gap(winner, full)}.",
            ]
            behind = search_behind(rows, config.fitness.validates)
            lines += ["", behind] if behind else []
    else:
        lines.append(
            "No held-out scores yet (they are written when the search ends; "
            "add baselines.json to compare methods)."
        )
    # the plot's methods are the table's rows: the search and full model from summary.json included
    plotted = baselines and {
        **baselines,
        "methods": {r.method: {"heldout": r.heldout, "heldout_std": r.heldout_std} for r in rows},
    }
    if plotted and point:  # a frontier has a pick at the sweep's sizes too
        picks = summary["picks"]
        plotted["sweep"] = {
            k: {**scores, **({"search": picks[k]["heldout"]["mean"]} if k in picks else {})}
            for k, scores in plotted.get("sweep", {}).items()
        }
    if plotted and sweep_series(plotted, keep):
        plot_methods(plotted, methods_png, f"{config.name}: held-out score by experts kept", keep)
        lines += [
            "",
            *sweep_table(sweep_series(plotted, keep)),
            "",
            "![held-out score by experts kept](methods.png)",
        ]
    else:
        methods_png.unlink(missing_ok=True)

    frontier_png = run.path / "frontier.png"
    if summary and summary.get("front"):
        lines += _frontier_lines(summary, config, baselines, frontier_png)
    else:
        frontier_png.unlink(missing_ok=True)

    path = run.path / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _starts_judged(starts: dict[str, str], validation: dict[str, float | None]) -> str:
    """The report's words for what the search started from, which a validation pick judges too
    (``summary["selected"]``'s ``starts``, names by candidate id, and ``candidates``, validation
    scores by candidate id: None where scoring stopped once it could not win)."""
    if not starts:
        return ""

    def score(i: str) -> str:
        value = validation.get(i)
        return "no higher, cut short" if value is None else f"validation {value:.2f}"

    which = "; ".join(f"candidate {i}, {name}: {score(i)}" for i, name in starts.items())
    return f", judged with what the search started from ({which})"


def _heldout_counts(config) -> str | None:
    """How many held-out examples each task's scores rest on, where its data is local (a short
    file holds fewer than ``test_size``); None when no task's data can be read here."""
    from fitness.tasks import example_counts

    try:
        counts = example_counts(config.fitness.tasks)
    except EepError:  # the data moved since the run: the table stands without the counts
        return None
    if not counts:
        return None
    return (
        "Held-out examples per task: "
        + ", ".join(f"{name} {n['test']}" for name, n in counts.items())
        + "."
    )


def _seeds_line(config) -> str | None:
    """The report's line on the run's seed genomes, evaluated before any random one: the
    calibration warm starts ``eep search`` saved as ``seeds/warm-<name>.json`` (by name: method, or
    method-size on a frontier) and any given ones; None without seeds."""
    names = config.search.seed_genomes
    warm = [w for w in map(warm_seed_name, names) if w is not None]
    given = len(names) - len(warm)
    parts = [f"calibration warm starts {', '.join(warm)}"] if warm else []
    parts += [f"{given} given"] if given else []
    return f"- seed genomes, evaluated first: {len(names)} ({'; '.join(parts)})" if names else None


def _breeding_starts(config, evaluations: Sequence[Evaluation]) -> int:
    """The first bred candidate: after greedy elimination's (a greedy warm start), the seed
    genomes and the random initial ones (:mod:`eep.loop`)."""
    from eep import greedy
    from search_spaces import PruneSpace

    search, warm = config.search, 0
    if isinstance(search.warm_start, list) and "greedy" in search.warm_start:
        genome = evaluations[0].genome
        layers = tuple(i for i, _ in genome.layers)
        space = PruneSpace(
            genome.num_experts,
            genome.top_k,
            layers,
            config.search_space.keep,
            config.search_space.top_k,
        )
        warm = greedy.cost(space)
    seeds = len(search.seed_genomes)
    return warm + seeds + random_initial(search, warm, seeds)


def _moei2_lines(summary: dict, config) -> list[str]:
    """A MoE-I² run's stages: keep counts, the layer searches, the KT blocks, the ranks."""
    stages = summary["stages"]
    counts = summary["keep_counts"]
    lines = [
        f"- stage 1: {sum(counts.values())} experts kept, per layer "
        + ", ".join(f"{layer}: {n}" for layer, n in counts.items())
        + f" ({config.moei2.importance} importance)",
        f"- layer-wise searches: {summary['evaluations']} evaluations in all (`stage1/layer-NN/journal.jsonl`)",
        "- KT blocks: "
        + "; ".join(
            (
                f"layer {b['layers'][0]}"
                if len(b["layers"]) == 1
                else f"layers {b['layers'][0]}–{b['layers'][-1]}"
            )
            + f": {b['combinations']} combination{'s' if b['combinations'] != 1 else ''}"
            for b in summary["blocks"]
        ),
    ]
    if "stage2" in stages:
        ranks = [
            r
            for gene in stages["stage2"]["genome"]["layers"].values()
            for r in gene.get("rank", [])
        ]
        how = (
            "activation-aware"
            if stages["stage2"]["genome"].get("activation_scales")
            else "plain SVD"
        )
        lines.append(
            f"- stage 2: low-rank experts ({how}), ranks {min(ranks)}–{max(ranks)}, mean "
            f"{sum(ranks) / len(ranks):.1f}"
        )
    for name, stage in stages.items():
        held = stage["heldout"]
        lines.append(
            f"- {name.replace('stage', 'stage ')}: held-out {held['mean']:.2f}, "
            f"{human_count(held.get('kept_params'))} parameters kept"
        )
    return lines


def _gap(row: Row, full: Row | None) -> str:
    if full is None:
        return ""
    gap = row.heldout - full.heldout
    where = (
        "level with"
        if round(gap, 1) == 0
        else f"{abs(gap):.1f} points {'below' if gap < 0 else 'above'}"
    )
    return f", {where} the full model ({full.heldout:.1f})"


def _space(config, evaluations: Sequence[Evaluation]) -> str:
    space = config.search_space
    experts = evaluations[0].genome.num_experts if evaluations else None
    if config.search.frontier:
        after = config.search.smallest_from
        smallest = f"; the smallest size alone from evaluation {after}" if after is not None else ""
        what = (
            "every keep set and top-k per layer"
            if "latency" in config.search.objectives
            else "every size"
        )
        return f"{what} (objectives: {', '.join(config.search.objectives)}){smallest}"
    if space.keep is not None:
        size = f"keep {space.keep}" + (f" of {experts}" if experts else "") + " experts per layer"
    else:
        size = f"a budget of {space.budget} experts over all layers" + (
            f" ({experts} per layer)" if experts else ""
        )
    return f"{space.kind}, {size}" + (f", top-k {space.top_k}" if space.top_k else "")
