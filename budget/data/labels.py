"""Raw labels to class ids or regression targets, decided over all splits at once."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from adabudget.config import ConfigError, DataConfig

if TYPE_CHECKING:
    from adabudget.data.raw import Rows


def encode_labels(
    splits: dict[str, Rows],
    cfg: DataConfig,
    class_names: Optional[list[str]],
    float_label: bool,
) -> tuple[bool, int, Optional[list[str]]]:
    """Turn raw labels into ints ``0..K-1`` or floats, in place; return the label kind.

    The mapping is built over all splits together, so a class seen only in dev still gets
    an id and the ids do not depend on ``max_*_samples``.
    """
    values = []
    for name, rows in splits.items():
        for i, value in enumerate(rows.label):
            if value is None:
                raise ConfigError(
                    f"data.label_column: row {i} of the {name} split has no {cfg.label_column!r} value; "
                    "fill it or drop the row"
                )
            if isinstance(value, bool):
                value = int(value)
                rows.label[i] = value
            if not isinstance(value, (int, float, str, np.integer, np.floating)):
                raise ConfigError(
                    f"data.label_column: labels must be ints or strings (or numbers for regression), "
                    f"got {value!r} in row {i} of the {name} split"
                )
            values.append(value)
    strings = [v for v in values if isinstance(v, str)]
    numbers = [v for v in values if not isinstance(v, str)]
    if strings and numbers:
        raise ConfigError(
            f"data.label_column: labels mix numbers and strings (e.g. {numbers[0]!r} and {strings[0]!r}); "
            "use one kind"
        )
    fractional = any(float(v) != int(v) for v in numbers if math.isfinite(float(v)))
    if any(not math.isfinite(float(v)) for v in numbers):
        raise ConfigError("data.label_column: labels contain nan or inf; fix or drop those rows")

    regression = cfg.regression
    if regression is None:
        regression = bool(numbers) and (fractional or float_label)
    if regression:
        if strings:
            raise ConfigError(
                f"data.regression: regression needs numeric labels, got strings such as {strings[0]!r}; "
                "set data.regression=false to classify"
            )
        for rows in splits.values():
            rows.label = [float(v) for v in rows.label]
        return True, 1, None

    if fractional:
        example = next(v for v in numbers if float(v) != int(v))
        raise ConfigError(
            f"data.label_column: classification labels must be ints or strings, got {example!r}; "
            "set data.regression=true for real-valued targets"
        )
    if strings:
        classes: list[Any] = sorted(set(strings))
    else:
        classes = sorted({int(v) for v in numbers})
    if len(classes) < 2:
        raise ConfigError(
            f"data.label_column: classification needs at least 2 classes, found {len(classes)} "
            f"({classes}) in {cfg.label_column!r}; check the column or use more data"
        )
    if not strings and class_names is not None and all(0 <= c < len(class_names) for c in classes):
        # A ClassLabel fixes the ids and names, even for classes absent from this data.
        num_labels, label_names = len(class_names), list(class_names)
    elif classes == list(range(len(classes))):
        num_labels, label_names = len(classes), None
    else:
        num_labels, label_names = 0, None
    if num_labels:
        for rows in splits.values():
            rows.label = [int(v) for v in rows.label]
        return False, num_labels, label_names
    # Strings, or ints that are not 0..K-1 (1..5 stars, -1/1): dense ids, original values
    # kept as names.
    index = {c: i for i, c in enumerate(classes)}
    for rows in splits.values():
        rows.label = [index[v if isinstance(v, str) else int(v)] for v in rows.label]
    return False, len(classes), [str(c) for c in classes]
