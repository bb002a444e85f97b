"""Drawing for `hosl report`: curves against step and values against one swept quantity.

Figures are built with matplotlib's object API (`Figure` + the Agg canvas), never pyplot: no
global figure state, no display needed, safe to call many times in one process. Each series is
one configuration; its seeds are averaged, with their min-max range shown as a band or as error
bars, so a reader sees both the effect and the noise it must beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIGSIZE = (7.5, 4.6)
DPI = 130


@dataclass
class Curve:
    """One series of a step plot: per seed, a list of (step, value)."""

    label: str
    runs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class Points:
    """One series of an x-y plot: the values (one per seed) measured at each x."""

    label: str
    values: dict[float, list[float]] = field(default_factory=dict)


@dataclass
class Reference:
    """A value that does not depend on x (an unsplit mode): drawn as a horizontal line."""

    label: str
    values: list[float] = field(default_factory=list)


def _colors(n: int) -> list[str]:
    # tab10 keeps the first ten series (the five modes) in matplotlib's familiar colours.
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _new_axes() -> tuple[Figure, object]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Figure, ax: object, path: Path, legend_title: str | None) -> Path:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        # Outside the axes: with ten series a legend inside would hide the curves.
        ax.legend(title=legend_title, fontsize="small", title_fontsize="small",
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "tight" grows the canvas to hold the legend outside the axes instead of squeezing them.
    fig.savefig(path, bbox_inches="tight")
    return path


def _align(runs: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[list[float]]]:
    """The steps every seed logged, and each seed's values at them."""
    tables = [dict(r) for r in runs if r]
    steps = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    if len(steps) < 2 and tables:
        tables, steps = tables[:1], sorted(tables[0])  # seeds logged different steps: show one
    return steps, [[t[s] for s in steps] for t in tables]


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over `window` values (shorter at the start, so no point is lost)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(
    curves: Sequence[Curve], *, title: str, ylabel: str, path: Path, smooth: bool = False,
    scale: float = 1.0, legend_title: str | None = None,
) -> Path:
    """Value against step, one line per series (mean over seeds, band: min-max over seeds).

    `smooth` draws a trailing moving average over about 1/25 of the run, with the raw mean
    faint behind it: per-step training losses on a batch of 16 are too noisy to read otherwise.
    """
    fig, ax = _new_axes()
    longest = max((len(r) for c in curves for r in c.runs), default=0)
    window = max(1, longest // 25) if smooth else 1
    for curve, color in zip(curves, _colors(len(curves))):
        steps, seeds = _align(curve.runs)
        if not steps:
            continue
        seeds = [[v * scale for v in values] for values in seeds]
        raw_mean = [sum(col) / len(col) for col in zip(*seeds)]
        if window > 1:
            # Smooth each seed first, so the band shows how seeds differ, not per-step noise.
            seeds = [_moving_average(values, window) for values in seeds]
        mean = [sum(col) / len(col) for col in zip(*seeds)]
        label = curve.label + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")
        if window > 1:
            ax.plot(steps, raw_mean, color=color, alpha=0.2, linewidth=0.7)
            ax.plot(steps, mean, color=color, linewidth=1.8, label=label)
        else:
            ax.plot(steps, mean, color=color, linewidth=1.6, marker="o", markersize=3,
                    label=label)
        if len(seeds) > 1:
            low, high = ([f(col) for col in zip(*seeds)] for f in (min, max))
            ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)
    ax.set_xlabel("training step")
    if window > 1:
        ylabel += f"\nmoving average over {window} steps; faint: raw"
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, ax, path, legend_title)


def plot_points(
    series: Sequence[Points], *, title: str, xlabel: str, ylabel: str, path: Path,
    references: Sequence[Reference] = (), scale: float = 1.0, xscale: float = 1.0,
    log2_x: bool = False, integer_x: bool = False, legend_title: str | None = None,
) -> Path:
    """y against x per series: mean over seeds, error bars from the min to the max seed."""
    fig, ax = _new_axes()
    colors = _colors(len(series) + len(references))
    any_spread = False
    all_x: set[float] = set()
    for points, color in zip(series, colors):
        xs = sorted(points.values)
        ys = [[v * scale for v in points.values[x]] for x in xs]
        mean = [sum(y) / len(y) for y in ys]
        err = [[m - min(y) for m, y in zip(mean, ys)], [max(y) - m for m, y in zip(mean, ys)]]
        any_spread |= any(len(y) > 1 for y in ys)
        plot_x = [x * xscale for x in xs]
        all_x.update(plot_x)
        ax.errorbar(plot_x, mean, yerr=err, color=color, marker="o", markersize=4, capsize=3,
                    linewidth=1.6, label=points.label)
    for ref, color in zip(references, colors[len(series):]):
        value = sum(ref.values) / len(ref.values) * scale
        ax.axhline(value, color=color, linestyle="--", linewidth=1.4, label=ref.label)
    if log2_x:
        ax.set_xscale("log", base=2)
    if integer_x or log2_x:
        ax.set_xticks(sorted(all_x))
        ax.set_xticklabels([f"{x:g}" for x in sorted(all_x)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + ("\n(mean over seeds; bars: min to max)" if any_spread else ""))
    return _save(fig, ax, path, legend_title)
