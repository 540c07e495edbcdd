"""benchmarks/demo_study.py's analysis: each method at its own best lr (the mean over the
tuning seeds), a diverged run never chosen, every seed reported at that lr, and the verdict."""
import argparse
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import demo_study  # noqa: E402


def _row(mean, **top1):
    top1 = top1 or {"shape": mean, "color": mean}
    return {"mean": mean, "mean_all": mean, "top1": top1, "best_lr_at_grid_end": []}


def _args(seeds=(0, 1), tune=(0,), blrs=(1e-3, 3e-3, 1e-2)):
    return argparse.Namespace(seeds=list(seeds), tune_seeds=list(tune), blrs=list(blrs), margin=3.0)


def test_each_method_is_reported_at_its_own_best_lr_on_the_tuning_seeds():
    rows = {
        "StableRep (synthetic)": {0: {1e-3: _row(0.70), 3e-3: _row(0.60), 1e-2: _row(0.50)},
                                  1: {1e-3: _row(0.68)}},
        "SimCLR (synthetic)": {0: {1e-3: _row(0.50), 3e-3: _row(0.66), 1e-2: _row(0.60)},
                               1: {3e-3: _row(0.62)}},
        "SimCLR (real)": {0: {1e-3: _row(0.40), 3e-3: _row(0.55),
                              1e-2: {"diverged": "nan", "mean": math.nan, "mean_all": math.nan}},
                          1: {3e-3: _row(0.60)}},
        "random init": {0: {None: _row(0.30)}, 1: {None: _row(0.32)}},
    }
    study = demo_study.analyse(rows, _args(), mean_over=("shape", "color"))
    m = study["methods"]
    assert m["StableRep (synthetic)"]["best_blr"] == 1e-3
    assert m["StableRep (synthetic)"]["best_blr_at_grid_end"]      # the grid's lowest lr
    assert m["SimCLR (synthetic)"]["best_blr"] == 3e-3
    assert not m["SimCLR (synthetic)"]["best_blr_at_grid_end"]
    assert m["SimCLR (real)"]["best_blr"] == 3e-3                   # the diverged lr is never best
    assert m["StableRep (synthetic)"]["mean"] == [0.70, 0.68]       # every seed at that lr
    assert m["random init"]["best_blr"] is None and m["random init"]["mean"] == [0.30, 0.32]
    gaps = study["verdict"]["gaps_points"]
    assert gaps["SimCLR (synthetic)"] == pytest.approx([4.0, 6.0])
    assert gaps["SimCLR (real)"] == pytest.approx([15.0, 8.0])
    assert study["verdict"]["met"]
    text = demo_study.report({**study, "mean_over": ["shape", "color"]})
    assert "target (>= 3 points over both SimCLR rows in every seed): met" in text


def test_a_gap_below_the_margin_in_one_seed_fails_the_target():
    rows = {"StableRep (synthetic)": {0: {1e-3: _row(0.70)}, 1: {1e-3: _row(0.64)}},
            "SimCLR (synthetic)": {0: {1e-3: _row(0.60)}, 1: {1e-3: _row(0.62)}},
            "SimCLR (real)": {0: {1e-3: _row(0.60)}, 1: {1e-3: _row(0.60)}}}
    study = demo_study.analyse(rows, _args(blrs=(1e-3,)), mean_over=("shape",))
    assert not study["verdict"]["met"]
    assert study["verdict"]["gaps_points"]["SimCLR (synthetic)"] == pytest.approx([10.0, 2.0])
