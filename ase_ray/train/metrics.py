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
    line, review = metrics.get("line"), metrics.get("review")
    if line:
        out.update({f"{prefix}escape_rate": line["escape_rate"], f"{prefix}overkill_rate": line["overkill_rate"],
                    f"{prefix}defect_threshold": line["threshold"]})
    if review:
        out.update({f"{prefix}review_share": review["review_share"],
                    f"{prefix}review_error_catch_rate": review["error_catch_rate"]})
    return out


def report_text(metrics: dict[str, Any]) -> str:
    lines = [f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for cls, s in metrics["per_class"].items():
        lines.append(f"{cls:<14}{s['precision']:>10.3f}{s['recall']:>10.3f}{s['f1']:>10.3f}{s['support']:>10}")
    lines.append(f"{'macro-F1':<14}{metrics['macro_f1']:>30.4f}")
    lines.append(f"{'accuracy':<14}{metrics['accuracy']:>30.4f}")
    return "\n".join(lines + line_text(metrics))


def line_text(metrics: dict[str, Any]) -> list[str]:
    """The line's figures as ``escape_rate`` / ``overkill_rate`` / review lines (none without them)."""
    out = []
    if line := metrics.get("line"):
        out.append(f"escape_rate {line['escape_rate']:.4f} ({line['escapes']} of {line['defects']} defective "
                   f"parts passed; reject at P(defect) >= {line['threshold']:.4f})")
        out.append(f"overkill_rate {line['overkill_rate']:.4f} ({line['overkills']} of {line['normals']} good parts rejected)")
    if review := metrics.get("review"):
        out.append(f"review {review['review_share']:.3f} of parts (confidence < {review['threshold']:.4f}) catch "
                   f"{review['errors_caught']} of {review['errors']} wrong labels ({review['error_catch_rate']:.3f})")
    return out


def reliability_figure(curves: dict[str, np.ndarray], labels: np.ndarray, title: str, bins: int = 10):
    """Reliability diagram: accuracy against confidence per equal-width bin, one curve per entry of
    ``curves`` (name -> probabilities), with the diagonal of perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    edges = np.linspace(0, 1, bins + 1)
    for name, probs in curves.items():
        confidence, correct = probs.max(1), (probs.argmax(1) == labels)
        which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
        xs = [confidence[which == b].mean() for b in range(bins) if (which == b).any()]
        ys = [correct[which == b].mean() for b in range(bins) if (which == b).any()]
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


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
