"""Classification metrics: macro-F1 (the paper's metric), accuracy, per-class scores, confusion matrix."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
        "n": int(len(y_true)),
    }


def flat_metrics(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """Scalars for MLflow: ``<prefix>macro_f1``, ``<prefix>accuracy``, ``<prefix>f1_<class>``."""
    out = {f"{prefix}macro_f1": metrics["macro_f1"], f"{prefix}accuracy": metrics["accuracy"]}
    for cls, scores in metrics["per_class"].items():
        out[f"{prefix}f1_{_safe(cls)}"] = scores["f1"]
    return out


def report_text(metrics: dict[str, Any]) -> str:
    lines = [f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for cls, s in metrics["per_class"].items():
        lines.append(f"{cls:<14}{s['precision']:>10.3f}{s['recall']:>10.3f}{s['f1']:>10.3f}{s['support']:>10}")
    lines.append(f"{'macro-F1':<14}{metrics['macro_f1']:>30.4f}")
    lines.append(f"{'accuracy':<14}{metrics['accuracy']:>30.4f}")
    return "\n".join(lines)


def confusion_figure(metrics: dict[str, Any], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(metrics["confusion_matrix"])
    classes = metrics["classes"]
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in name)
