"""Classification metrics computed from counts that sites can share and add up.

Each site returns a confusion matrix and, per class, histograms of the
one-vs-rest score of the images of that class and of the other images. Summing
these over sites gives the counts of the pooled test sets, so accuracy,
balanced accuracy, per-class recall and macro AUC are those of all sites'
test images together, weighted by example count. No Flower imports.
"""

from __future__ import annotations

import numpy as np
import torch

# The one-vs-rest score is the log-odds log(p / (1 - p)) of a class, clipped to
# this range and cut into SCORE_BINS equal bins. A bin is 0.03 wide, so only
# images whose scores are that close count as ties in the pooled AUC.
SCORE_RANGE = 15.0
SCORE_BINS = 1000


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Return counts[true class, predicted class] as an int64 array."""
    targets = np.asarray(targets, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    flat = np.bincount(targets * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def accuracy(confusion: np.ndarray) -> float:
    """Return the fraction of correct predictions. Raises ValueError without images."""
    total = int(np.sum(confusion))
    if total == 0:
        raise ValueError("Accuracy is undefined without images.")
    return float(np.trace(confusion)) / total


def recall_per_class(confusion: np.ndarray) -> list[float | None]:
    """Return each class's recall, None for a class without images."""
    totals = np.sum(confusion, axis=1)
    return [
        float(confusion[index, index]) / float(total) if total else None
        for index, total in enumerate(totals)
    ]


def balanced_accuracy(confusion: np.ndarray) -> float:
    """Return the mean recall over the classes that have at least one image.

    Raises ValueError without images.
    """
    recalls = [value for value in recall_per_class(confusion) if value is not None]
    if not recalls:
        raise ValueError("Balanced accuracy is undefined without images.")
    return float(np.mean(recalls))


def one_vs_rest_scores(logits: torch.Tensor) -> torch.Tensor:
    """Return log(p_c / (1 - p_c)) for every class c, computed stably from the logits."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    num_classes = log_p.shape[1]
    others = log_p.unsqueeze(1).expand(-1, num_classes, -1).clone()
    others[:, torch.arange(num_classes), torch.arange(num_classes)] = float("-inf")
    log_rest = torch.logsumexp(others, dim=2)
    return log_p - log_rest


def score_histograms(scores: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Return int64 counts of shape (classes, 2, SCORE_BINS).

    [c, 0] counts the class-c scores of images of class c (positives), [c, 1]
    those of the other images (negatives).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    bins = np.floor((np.clip(scores, -SCORE_RANGE, SCORE_RANGE) + SCORE_RANGE)
                    / (2 * SCORE_RANGE) * SCORE_BINS).astype(np.int64)
    bins = np.minimum(bins, SCORE_BINS - 1)
    histograms = np.zeros((num_classes, 2, SCORE_BINS), dtype=np.int64)
    for index in range(num_classes):
        positive = targets == index
        histograms[index, 0] = np.bincount(bins[positive, index], minlength=SCORE_BINS)
        histograms[index, 1] = np.bincount(bins[~positive, index], minlength=SCORE_BINS)
    return histograms


def auc_from_histograms(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """Return the probability that a positive outscores a negative, ties counted half.

    None when either side has no images.
    """
    positives = np.asarray(positives, dtype=np.float64)
    negatives = np.asarray(negatives, dtype=np.float64)
    num_pos, num_neg = positives.sum(), negatives.sum()
    if num_pos == 0 or num_neg == 0:
        return None
    below = np.cumsum(negatives) - negatives
    wins = np.sum(positives * below) + 0.5 * np.sum(positives * negatives)
    return float(wins / (num_pos * num_neg))


def auc_per_class(histograms: np.ndarray) -> list[float | None]:
    """Return each class's one-vs-rest AUC from score_histograms counts."""
    return [auc_from_histograms(histograms[index, 0], histograms[index, 1])
            for index in range(histograms.shape[0])]


def macro_auc(histograms: np.ndarray) -> float | None:
    """Return the mean one-vs-rest AUC over the classes where it is defined."""
    values = [value for value in auc_per_class(histograms) if value is not None]
    return float(np.mean(values)) if values else None


def exact_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Return the one-vs-rest AUC from raw scores by comparing every pair (for checks)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))
