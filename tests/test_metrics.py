"""compute_metrics against hand-computed values and scipy.

The expected numbers are worked out in the comments from the confusion matrices, so a
reader can check them without running anything.
"""

import warnings

import numpy as np
import pytest
from adabudget.metrics import compute_metrics, primary_metric
from scipy import stats


def test_primary_metric():
    assert primary_metric(regression=False) == "accuracy"
    assert primary_metric(regression=True) == "pearson"


def test_binary_by_hand():
    true = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    pred = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    # TP 3, FN 1, FP 1, TN 3: accuracy 6/8, F1 = 2*3 / (6 + 1 + 1),
    # MCC = (3*3 - 1*1) / sqrt(4*4*4*4) = 8/16.
    m = compute_metrics(pred, true, regression=False)
    assert m == pytest.approx({"accuracy": 0.75, "f1": 0.75, "matthews": 0.5})


def test_logits_give_the_same_as_class_ids():
    true = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    pred = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    logits = np.stack([-pred * 2.0 + 1.0, pred * 2.0 - 1.0], axis=1)  # (N, 2), argmax = pred
    assert compute_metrics(logits, true, regression=False) == compute_metrics(pred, true, regression=False)


def test_multiclass_by_hand():
    true = np.array([0, 1, 2, 0, 1, 2])
    pred = np.array([0, 1, 1, 0, 0, 2])
    # Per class (TP, FP, FN): 0 -> (2, 1, 0), 1 -> (1, 1, 1), 2 -> (1, 0, 1);
    # F1 = 4/5, 2/4, 2/3, macro = 0.65556.
    # MCC: t = (2, 2, 2), p = (3, 2, 1), c = 4, s = 6:
    # (4*6 - 12) / sqrt((36 - 14) * (36 - 12)) = 12 / sqrt(528).
    m = compute_metrics(pred, true, regression=False)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["matthews"] == pytest.approx(12 / np.sqrt(528))


def test_binary_mcc_matches_pearson_of_the_indicators():
    # For two classes MCC is the phi coefficient: Pearson's r of the 0/1 vectors.
    rng = np.random.default_rng(0)
    true = rng.integers(0, 2, 200)
    pred = np.where(rng.random(200) < 0.8, true, 1 - true)
    m = compute_metrics(pred, true, regression=False)
    assert m["matthews"] == pytest.approx(stats.pearsonr(pred, true)[0])


def test_degenerate_classification_is_quiet():
    true = np.array([0, 1, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constant = compute_metrics(np.zeros(4, dtype=int), true, regression=False)
        one_class_truth = compute_metrics(np.array([0, 1, 1, 1]), np.ones(4, dtype=int), regression=False)
    assert constant == {"accuracy": 0.5, "f1": 0.0, "matthews": 0.0}
    # Class 1 always right; MCC is undefined with a single true class and reported as 0.
    assert one_class_truth["matthews"] == 0.0
    assert one_class_truth["f1"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))


def test_regression_by_hand_and_against_scipy():
    pred = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    true = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    # Deviations (-2,-1,0,1,2) and (-1,-2,1,0,2): r = 8 / sqrt(10 * 10); the ranks equal the
    # values, so Spearman is 0.8 too; squared errors 1,1,1,1,0 -> mse 0.8.
    m = compute_metrics(pred[:, None], true, regression=True)  # (N, 1) as a model emits
    assert m == pytest.approx({"pearson": 0.8, "spearman": 0.8, "mse": 0.8})

    rng = np.random.default_rng(1)
    true = rng.normal(size=300)
    pred = true + rng.normal(scale=0.7, size=300)
    m = compute_metrics(pred, true, regression=True)
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred, true)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred, true)[0])
    assert m["mse"] == pytest.approx(np.mean((pred - true) ** 2))


def test_degenerate_regression_is_quiet():
    true = np.array([0.5, -1.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        constant = compute_metrics(np.full(3, 0.25), true, regression=True)
        diverged = compute_metrics(np.array([np.nan, 1.0, 2.0]), true, regression=True)
    assert constant["pearson"] == 0.0 and constant["spearman"] == 0.0
    assert constant["mse"] == pytest.approx(np.mean((0.25 - true) ** 2))
    assert diverged["pearson"] == 0.0 and np.isnan(diverged["mse"])


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="at least one"):
        compute_metrics(np.array([]), np.array([]), regression=False)
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics(np.array([0, 1, 1]), np.array([0, 1]), regression=False)
    with pytest.raises(ValueError, match=">= 0"):
        compute_metrics(np.array([0, 1]), np.array([-1, 1]), regression=False)
