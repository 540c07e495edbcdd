"""The demo report's figures (loss curves, linear-probe accuracy per learning rate, generation
throughput) and markdown tables.

Figures are drawn with matplotlib on a `Figure` rendered by the Agg canvas: no pyplot, so no
global figure state and no display backend to choose. Each plot has a `*_figure` function that
builds the Figure (tests read its axes) and a `plot_*` function that writes it as a PNG through
`fileio` (atomically, to local paths and gfile URLs alike) and returns the path.
"""
from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stablerep_jax import fileio

DPI = 100
DEFAULT_SIZE = (720, 420)        # pixels


def _figure(size: Sequence[int], ncols: int = 1) -> tuple[Figure, list]:
    """A figure of `size` pixels with `ncols` axes side by side, on its own Agg canvas."""
    width, height = size
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def write_png(path: str, fig: Figure) -> str:
    """Renders `fig` to PNG bytes and writes them atomically; returns `path`."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=DPI)
    return fileio.write_bytes_atomic(path, png.getvalue())


def _finite_pairs(series: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in series if math.isfinite(x) and math.isfinite(y)]


# --------------------------------------------------------------------------------------------
# Loss curves


def curves_figure(curves: Mapping[str, Sequence[tuple[float, float]]], title: str,
                  x_label: str = "step", y_label: str = "loss", size=DEFAULT_SIZE,
                  path: str = "<figure>") -> Figure:
    """Named (x, y) series as lines with a legend; non-finite points are left out. Raises
    ValueError naming `path` when no series has a finite point."""
    finite = {name: _finite_pairs(series) for name, series in curves.items()}
    if not any(finite.values()):
        raise ValueError(f"plot_curves({path!r}): no finite (x, y) points to draw in "
                         f"{sorted(curves) or 'an empty dict'}")
    fig, (ax,) = _figure(size)
    for name, points in finite.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name, linewidth=1.5, marker="." if len(points) == 1 else None)
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_curves(path: str, curves: Mapping[str, Sequence[tuple[float, float]]], title: str,
                x_label: str = "step", y_label: str = "loss", size=DEFAULT_SIZE) -> str:
    """Writes named (x, y) series (e.g. the loss per step of each run) as a PNG of `size`
    pixels; returns `path`."""
    return write_png(path, curves_figure(curves, title, x_label, y_label, size, path))


# --------------------------------------------------------------------------------------------
# Linear probe: top-1 per base learning rate


def probe_accuracy_figure(results: Mapping, title: str = "linear probe", size=DEFAULT_SIZE,
                          path: str = "<figure>") -> Figure:
    """Test top-1 (%) against base lr (log x) from linear_probe's results.json: one line per
    evaluated epoch (`grid`), the best over epochs in black, the best (epoch, lr) starred."""
    grid = results.get("grid")
    if not grid or not all(key in grid for key in ("epochs", "base_lrs", "top1")):
        raise ValueError(f"plot_probe_accuracy({path!r}): results need a 'grid' with 'epochs', "
                         "'base_lrs' and 'top1' (linear_probe's results.json has them)")
    base_lrs = np.asarray(grid["base_lrs"], np.float64)
    top1 = 100.0 * np.asarray(grid["top1"], np.float64).reshape(len(grid["epochs"]), len(base_lrs))
    usable = (base_lrs > 0) & np.isfinite(base_lrs)
    top1 = np.where(usable[None, :] & np.isfinite(top1), top1, np.nan)
    if np.isnan(top1).all():
        raise ValueError(f"plot_probe_accuracy({path!r}): no finite top-1 at a positive base lr "
                         f"(base_lrs {base_lrs.tolist()})")
    order = np.argsort(base_lrs)
    base_lrs, top1 = base_lrs[order], top1[:, order]
    fig, (ax,) = _figure(size)
    cmap = colormaps["viridis"]
    last = len(top1) - 1
    for i, (epoch, row) in enumerate(zip(grid["epochs"], top1)):
        # Early epochs dark, late ones light; only the first and last are named in the legend.
        ax.plot(base_lrs, row, color=cmap(0.9 * i / max(last, 1)), linewidth=1, alpha=0.8,
                marker=".", label=f"epoch {epoch}" if i in (0, last) else None)
    best = np.nanmax(top1, axis=0)
    ax.plot(base_lrs, best, color="black", linewidth=2, linestyle="--", label="best over epochs")
    e_best, h_best = np.unravel_index(np.nanargmax(top1), top1.shape)
    ax.plot([base_lrs[h_best]], [top1[e_best, h_best]], marker="*", markersize=14, color="red",
            linestyle="none",
            label=f"best {top1[e_best, h_best]:.1f}% (lr {base_lrs[h_best]:g}, "
                  f"epoch {grid['epochs'][e_best]})")
    ax.set_xscale("log")
    ax.set(title=title, xlabel="base learning rate", ylabel="test top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return fig


def plot_probe_accuracy(path: str, results: Mapping, title: str = "linear probe",
                        size=DEFAULT_SIZE) -> str:
    """Writes top-1 per base lr of a linear-probe sweep (its results.json) as a PNG; returns
    `path`."""
    return write_png(path, probe_accuracy_figure(results, title, size, path))


def _best_over_epochs(results: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(base lrs sorted, best top-1 (%) over the evaluated epochs at each) of a sweep's grid."""
    grid = results["grid"]
    base_lrs = np.asarray(grid["base_lrs"], np.float64)
    top1 = 100.0 * np.asarray(grid["top1"], np.float64).reshape(len(grid["epochs"]), len(base_lrs))
    order = np.argsort(base_lrs)
    return base_lrs[order], np.nanmax(top1, axis=0)[order]


def probe_attributes_figure(results: Mapping[str, Mapping[str, Mapping]],
                            title: str = "linear probe per attribute", size=(1200, 330),
                            path: str = "<figure>") -> Figure:
    """One panel per probed attribute, one line per encoder: the best test top-1 (%) over
    epochs against the base lr (log x). `results[encoder][attribute]` is a sweep's results
    (with its `grid`), as `linear_probe.probe_cached` returns. A best lr at an end of the grid
    shows as a line still rising at the edge: the sweep did not bracket it."""
    encoders = list(results)
    attributes = list(results[encoders[0]]) if encoders else []
    if not attributes or any(list(results[e]) != attributes for e in encoders):
        raise ValueError(f"probe_attributes_figure({path!r}): every encoder needs results for the "
                         f"same attributes; got {({e: list(r) for e, r in results.items()})}")
    fig, axes = _figure(size, ncols=len(attributes))
    for ax, attribute in zip(axes, attributes):
        for encoder in encoders:
            lrs, best = _best_over_epochs(results[encoder][attribute])
            ax.plot(lrs, best, marker=".", linewidth=1.5, label=encoder)
        ax.set_xscale("log")
        ax.set(title=attribute, xlabel="base lr")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test top-1 (%)")
    axes[-1].legend(fontsize="small")
    fig.suptitle(title)
    return fig


def plot_probe_attributes(path: str, results: Mapping[str, Mapping[str, Mapping]],
                          title: str = "linear probe per attribute", size=(1200, 330)) -> str:
    """Writes `probe_attributes_figure` as a PNG; returns `path`."""
    return write_png(path, probe_attributes_figure(results, title, size, path))


# --------------------------------------------------------------------------------------------
# Generation throughput


def _run_rates(run: Mapping) -> tuple[float, float]:
    """(images/s, images/s per device) of one entry of generate's summary.json `runs`,
    recomputed from its counts when the entry predates the rate fields."""
    images, seconds = float(run.get("images", 0)), float(run.get("seconds", 0.0))
    devices = int(run.get("devices") or 0)
    rate = float(run.get("images_per_s", images / seconds if seconds > 0 else math.nan))
    per_device = float(run.get("images_per_s_per_device",
                               rate / devices if devices else math.nan))
    return rate, per_device


def _run_label(i: int, run: Mapping) -> str:
    devices = run.get("devices")
    kind = run.get("device_kind") or "device"
    return f"run {i + 1}" + (f"\n{devices} x {kind}" if devices else "")


def throughput_figure(runs: Sequence[Mapping], title: str = "generation throughput",
                      size=DEFAULT_SIZE, path: str = "<figure>") -> Figure:
    """Bars of images/s (left) and images/s per device (right), one per run of generate
    (summary.json's `runs`); runs with no finite positive rate are left out."""
    rows = [(i, run, *_run_rates(run)) for i, run in enumerate(runs)]
    rows = [row for row in rows if math.isfinite(row[2]) and row[2] > 0]
    if not rows:
        raise ValueError(f"plot_throughput({path!r}): none of the {len(runs)} runs has a finite "
                         "positive images/s (images and seconds of summary.json's runs)")
    fig, (ax_total, ax_device) = _figure(size, ncols=2)
    labels = [_run_label(i, run) for i, run, _, _ in rows]
    positions = np.arange(len(rows))
    for ax, values, name in ((ax_total, [r[2] for r in rows], "images/s"),
                             (ax_device, [r[3] for r in rows], "images/s per device")):
        heights = [v if math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(positions, heights, color="tab:blue")
        ax.bar_label(bars, labels=[f"{v:.3g}" if math.isfinite(v) else "?" for v in values],
                     fontsize="small")
        ax.set_xticks(positions, labels, fontsize="small")
        ax.set(ylabel=name, title=name)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    return fig


def plot_throughput(path: str, runs: Sequence[Mapping], title: str = "generation throughput",
                    size=DEFAULT_SIZE) -> str:
    """Writes the throughput of generate's runs (summary.json's `runs`) as a PNG; returns
    `path`."""
    return write_png(path, throughput_figure(runs, title, size, path))


# --------------------------------------------------------------------------------------------
# Markdown


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
