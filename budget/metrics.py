"""Evaluation metrics, in numpy and scipy only.

Classification reports accuracy, F1 and the Matthews correlation (GLUE's CoLA metric);
regression reports Pearson and Spearman correlation (STS-B's) and the mean squared error.
Degenerate inputs give numbers, not warnings: a correlation with a constant side is
undefined and reported as 0.0, which is what a model that predicts a constant deserves.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def primary_metric(regression: bool, scoring=None) -> str:
    """The metric that picks the best checkpoint and ranks search trials (higher is better).

    ``scoring`` (a causal-LM task's ``Scoring``): ``exact_match``, ``rougeL`` or ``neg_perplexity``.
    """
    if scoring is not None:
        return {"exact_match": "exact_match", "rouge": "rougeL", "perplexity": "neg_perplexity"}[
            scoring.metric
        ]
    return "pearson" if regression else "accuracy"


def compute_metrics(predictions: np.ndarray, labels: np.ndarray, regression: bool) -> dict[str, float]:
    """Score predictions against labels.

    Args:
        predictions: Classification: logits ``(N, C)`` or class ids ``(N,)``.
            Regression: values ``(N,)`` or ``(N, 1)``.
        labels: ``(N,)`` class ids or target values.
        regression: Which family of metrics to compute.

    Returns:
        Classification: ``accuracy``, ``f1`` (F1 of class 1 when there are two classes,
        else the macro average over the classes that occur in labels or predictions, as
        scikit-learn does) and ``matthews``. Regression: ``pearson``, ``spearman`` and
        ``mse``. All plain floats.

    Raises:
        ValueError: on empty input or when predictions and labels differ in length.
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        raise ValueError("compute_metrics needs at least one example")
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if regression:
        return _regression(predictions.reshape(len(labels), -1)[:, 0].astype(float), labels.astype(float))
    if predictions.ndim == 2:
        num_classes = predictions.shape[1]
        predictions = predictions.argmax(axis=1)
    elif predictions.ndim == 1:
        num_classes = 0  # inferred from the ids below
    else:
        raise ValueError(
            f"classification predictions must be (N, C) logits or (N,) ids, got {predictions.shape}"
        )
    predictions, labels = predictions.astype(np.int64), labels.astype(np.int64)
    if predictions.min() < 0 or labels.min() < 0:
        raise ValueError("class ids must be >= 0 (a hidden label such as -1 cannot be scored)")
    return _classification(predictions, labels, num_classes)


def _classification(pred: np.ndarray, true: np.ndarray, num_classes: int) -> dict[str, float]:
    k = max(num_classes, int(max(pred.max(), true.max())) + 1)
    confusion = np.zeros((k, k), dtype=np.int64)  # rows: true class, columns: predicted
    np.add.at(confusion, (true, pred), 1)
    tp = np.diag(confusion).astype(float)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        # A class never predicted nor present has 0/0; scikit-learn's zero_division=0.
        f1_per_class = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    if k <= 2:
        f1 = f1_per_class[1] if k == 2 else 0.0
    else:
        present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
        f1 = f1_per_class[present].mean()
    return {
        "accuracy": float(tp.sum() / len(true)),
        "f1": float(f1),
        "matthews": _matthews(confusion),
    }


def _matthews(confusion: np.ndarray) -> float:
    """Multiclass MCC (Gorodkin 2004); the usual phi coefficient for two classes.

    MCC = (c s - t·p) / sqrt((s² - p·p)(s² - t·t)), with t and p the true and predicted
    class counts, c the correct predictions and s the number of examples. A constant
    prediction (or a constant truth) zeroes a factor of the denominator: MCC is then 0.
    """
    t = confusion.sum(axis=1).astype(float)
    p = confusion.sum(axis=0).astype(float)
    c = float(np.trace(confusion))
    s = float(confusion.sum())
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator > 0 else 0.0


def _regression(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    with np.errstate(over="ignore", invalid="ignore"):
        mse = float(np.mean((pred - true) ** 2))
    # scipy warns and returns nan for constant or non-finite inputs (e.g. a collapsed or
    # diverged model); report no correlation instead.
    usable = (
        len(pred) >= 2
        and np.isfinite(pred).all()
        and np.isfinite(true).all()
        and np.ptp(pred) > 0
        and np.ptp(true) > 0
    )
    if not usable:
        return {"pearson": 0.0, "spearman": 0.0, "mse": mse}
    return {
        "pearson": float(np.nan_to_num(stats.pearsonr(pred, true)[0])),
        "spearman": float(np.nan_to_num(stats.spearmanr(pred, true)[0])),
        "mse": mse,
    }
