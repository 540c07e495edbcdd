"""Figures: each PNG decodes at the requested size, axis ticks sit on round numbers, the data
drawn are the data given, bad input fails naming the path, and writes go through fileio."""
import io
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from stablerep_jax.demo import report

NICE_MANTISSAS = (1.0, 2.0, 2.5, 5.0)


def _is_nice_step(step: float) -> bool:
    mantissa = step / 10 ** math.floor(math.log10(step))
    return any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (*NICE_MANTISSAS, 10.0))


def _visible(ticks, limits):
    low, high = sorted(limits)
    return [t for t in ticks if low - 1e-9 * abs(high - low) <= t <= high + 1e-9 * abs(high - low)]


def assert_nice_linear_ticks(ticks, limits):
    """At least 3 visible ticks, evenly spaced by 1, 2, 2.5 or 5 x 10^k, each a multiple of it."""
    ticks = _visible(ticks, limits)
    assert len(ticks) >= 3, ticks
    steps = np.diff(ticks)
    step = float(steps[0])
    assert np.allclose(steps, step, rtol=1e-6), ticks
    assert _is_nice_step(step), (step, ticks)
    for t in ticks:
        assert math.isclose(t / step, round(t / step), abs_tol=1e-6), (t, step)


def assert_decade_ticks(ticks, limits):
    ticks = _visible(ticks, limits)
    assert ticks, ticks
    for t in ticks:
        assert math.isclose(math.log10(t), round(math.log10(t)), abs_tol=1e-9), ticks


def test_the_tick_check_rejects_the_old_plots_ticks():
    """The PIL plot split the data range in four: x ticks 5, 78.5, ..., y ticks 1.04, 1.355, ..."""
    with pytest.raises(AssertionError):
        assert_nice_linear_ticks([5 + 73.5 * i for i in range(5)], (5, 299))
    with pytest.raises(AssertionError):
        assert_nice_linear_ticks([1.04 + 0.315 * i for i in range(5)], (1.04, 2.3))
    with pytest.raises(AssertionError):
        assert_decade_ticks([0.001, 0.003, 0.01], (0.001, 0.5))


def _png_size(path):
    with tf.io.gfile.GFile(path, "rb") as f:
        image = Image.open(io.BytesIO(f.read()))
        image.load()
    assert image.format == "PNG"
    return image.size


# The old PIL plot put ticks at five evenly spaced raw values: 5, 79, 152, ... and 1.04, 2.3, ...
AWKWARD_CURVES = {
    "StableRep": [(s, 2.3 - 0.008 * s) for s in range(5, 300, 7)],
    "SimCLR": [(s, 1.04 + 1.2 * math.exp(-s / 90)) for s in range(5, 300, 7)] + [(305, math.nan)],
}


def test_loss_curves_have_nice_ticks_and_the_given_points(tmp_path):
    fig = report.curves_figure(AWKWARD_CURVES, "training loss")
    (ax,) = fig.axes
    fig.canvas.draw()
    assert_nice_linear_ticks(ax.get_xticks(), ax.get_xlim())
    assert_nice_linear_ticks(ax.get_yticks(), ax.get_ylim())
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == set(AWKWARD_CURVES)
    xs, ys = lines["SimCLR"].get_data()
    assert len(xs) == len(AWKWARD_CURVES["SimCLR"]) - 1          # the NaN point is left out
    np.testing.assert_allclose(ys, [y for _, y in AWKWARD_CURVES["SimCLR"][:-1]])
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"


def test_plot_curves_writes_a_png_of_the_requested_size(tmp_path):
    path = str(tmp_path / "curves.png")
    assert report.plot_curves(path, AWKWARD_CURVES, "loss") == path
    assert _png_size(path) == report.DEFAULT_SIZE
    report.plot_curves(path, AWKWARD_CURVES, "loss", size=(400, 300))
    assert _png_size(path) == (400, 300)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]     # no temporary left


def test_plot_curves_writes_to_gfile_urls(ram_dir):
    path = f"{ram_dir}/curves.png"
    report.plot_curves(path, {"a": [(0, 1.0), (1, 0.5)]}, "loss")
    assert _png_size(path) == report.DEFAULT_SIZE


@pytest.mark.parametrize("curves", [{}, {"a": []}, {"a": [(0, math.nan), (1, math.inf)]}])
def test_curves_without_finite_points_fail_naming_the_path(tmp_path, curves):
    path = str(tmp_path / "loss.png")
    with pytest.raises(ValueError, match="loss.png.*no finite"):
        report.plot_curves(path, curves, "loss")
    assert not list(tmp_path.iterdir())


def _probe_results():
    """The shape of linear_probe's results.json: top-1 on an (evaluated epoch, base lr) grid."""
    base_lrs = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
    epochs = [10, 20, 30]
    log_lr = np.log10(base_lrs)
    top1 = [(0.5 + 0.1 * i - 0.05 * (log_lr + 1) ** 2).tolist() for i in range(len(epochs))]
    return {"best_top1": max(max(r) for r in top1), "best_lr": 0.1, "best_epoch": 30,
            "grid": {"epochs": epochs, "base_lrs": base_lrs, "top1": top1}}


def test_probe_accuracy_plots_each_epoch_against_log_lr(tmp_path):
    results = _probe_results()
    fig = report.probe_accuracy_figure(results)
    (ax,) = fig.axes
    fig.canvas.draw()
    assert ax.get_xscale() == "log"
    assert_decade_ticks(ax.get_xticks(), ax.get_xlim())
    assert_nice_linear_ticks(ax.get_yticks(), ax.get_ylim())
    lines = ax.get_lines()
    assert len(lines) == 3 + 2                          # each epoch, best over epochs, the star
    xs, ys = lines[2].get_data()                        # epoch 30, in percent
    np.testing.assert_allclose(xs, results["grid"]["base_lrs"])
    np.testing.assert_allclose(ys, 100 * np.asarray(results["grid"]["top1"][2]))
    star_x, star_y = lines[-1].get_data()
    assert star_x[0] == pytest.approx(0.1) and star_y[0] == pytest.approx(100 * results["best_top1"])
    path = str(tmp_path / "probe.png")
    assert report.plot_probe_accuracy(path, results) == path
    assert _png_size(path) == report.DEFAULT_SIZE


def test_probe_accuracy_bad_input_fails_naming_the_path(tmp_path):
    path = str(tmp_path / "probe.png")
    with pytest.raises(ValueError, match="probe.png.*'grid'"):
        report.plot_probe_accuracy(path, {"best_top1": 0.5})
    results = _probe_results()
    results["grid"]["top1"] = [[math.nan] * 10] * 3
    with pytest.raises(ValueError, match="probe.png.*no finite top-1"):
        report.plot_probe_accuracy(path, results)
    assert not list(tmp_path.iterdir())


def _runs():
    """Entries of generate's summary.json `runs`; the last predates the rate fields."""
    return [
        {"images": 640, "seconds": 80.0, "images_per_s": 8.0, "images_per_s_per_device": 1.0,
         "devices": 8, "device_kind": "TPU v4"},
        {"images": 1000, "seconds": 25.0, "images_per_s": 40.0, "images_per_s_per_device": 1.25,
         "devices": 32, "device_kind": "TPU v4"},
        {"images": 300, "seconds": 100.0, "devices": 1, "device_kind": "cpu"},
    ]


def test_throughput_bars_per_run_and_per_device(tmp_path):
    fig = report.throughput_figure(_runs())
    ax_total, ax_device = fig.axes
    fig.canvas.draw()
    np.testing.assert_allclose([p.get_height() for p in ax_total.patches], [8.0, 40.0, 3.0])
    np.testing.assert_allclose([p.get_height() for p in ax_device.patches], [1.0, 1.25, 3.0])
    for ax in (ax_total, ax_device):
        assert_nice_linear_ticks(ax.get_yticks(), ax.get_ylim())
    labels = [t.get_text() for t in ax_total.get_xticklabels()]
    assert labels[1] == "run 2\n32 x TPU v4"
    path = str(tmp_path / "throughput.png")
    assert report.plot_throughput(path, _runs()) == path
    assert _png_size(path) == report.DEFAULT_SIZE


@pytest.mark.parametrize("runs", [[], [{"images": 0, "seconds": 0.0}]])
def test_throughput_without_a_rate_fails_naming_the_path(tmp_path, runs):
    path = str(tmp_path / "throughput.png")
    with pytest.raises(ValueError, match="throughput.png.*finite positive images/s"):
        report.plot_throughput(path, runs)


def test_markdown_table():
    assert report.markdown_table(["a", "b"], [(1, "x"), (2, "y")]) == (
        "| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |")
