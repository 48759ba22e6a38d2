"""Tests of the app's metrics against values computed by hand."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

APP_DIR = Path(__file__).resolve().parents[1] / "melody_app"
# The app directory is a Flower app, not an installed package.
sys.path.insert(0, str(APP_DIR))
from skin_lesion import metrics  # noqa: E402


def test_confusion_matrix_by_hand() -> None:
    targets = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 2])

    confusion = metrics.confusion_matrix(targets, predicted, num_classes=4)

    assert confusion.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert metrics.accuracy(confusion) == pytest.approx(4 / 6)
    # Recalls 2/3, 1/2 and 1/1; class 3 has no images and is left out.
    assert metrics.recall_per_class(confusion) == pytest.approx([2 / 3, 1 / 2, 1.0, None])
    assert metrics.balanced_accuracy(confusion) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_majority_class_predictions() -> None:
    # Predicting the majority class everywhere: 90 % accuracy, 50 % balanced accuracy.
    confusion = np.array([[90, 0], [10, 0]])

    assert metrics.accuracy(confusion) == pytest.approx(0.9)
    assert metrics.balanced_accuracy(confusion) == pytest.approx(0.5)


def test_balanced_accuracy_pooled_not_averaged() -> None:
    site_a = np.array([[8, 2], [0, 0]])  # only class 0: recall 0.8
    site_b = np.array([[0, 0], [3, 1]])  # only class 1: recall 0.25

    pooled = metrics.balanced_accuracy(site_a + site_b)

    assert pooled == pytest.approx((0.8 + 0.25) / 2)
    assert pooled != pytest.approx((10 * 0.8 + 4 * 0.25) / 14)


def test_metrics_without_images() -> None:
    with pytest.raises(ValueError, match="undefined without images"):
        metrics.balanced_accuracy(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="undefined without images"):
        metrics.accuracy(np.zeros((3, 3)))


def test_auc_by_hand() -> None:
    # Positives score 0.9 and 0.4, negatives 0.5, 0.3 and 0.4. Of the 6 pairs,
    # (0.9, any) wins 3, (0.4, 0.3) wins 1, (0.4, 0.4) ties: (3 + 1 + 0.5) / 6.
    scores = np.array([0.9, 0.4, 0.5, 0.3, 0.4])
    positive = np.array([True, True, False, False, False])

    assert metrics.exact_auc(scores, positive) == pytest.approx(4.5 / 6)


def test_auc_from_histograms_by_hand() -> None:
    # Bins 0..3: positives in bins 3 and 1, negatives in bins 2, 0 and 1.
    positives = np.array([0, 1, 0, 1])
    negatives = np.array([1, 1, 1, 0])

    assert metrics.auc_from_histograms(positives, negatives) == pytest.approx(4.5 / 6)
    assert metrics.auc_from_histograms(positives, np.zeros(4)) is None


def test_one_vs_rest_scores_are_log_odds() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    probabilities = torch.softmax(logits, dim=1)

    scores = metrics.one_vs_rest_scores(logits)

    expected = torch.log(probabilities / (1 - probabilities))
    assert torch.allclose(scores, expected, atol=1e-5)


def test_histogram_auc_matches_exact_auc() -> None:
    generator = np.random.default_rng(0)
    targets = generator.integers(0, 3, size=600)
    logits = generator.normal(size=(600, 3)) + 1.5 * np.eye(3)[targets]
    scores = metrics.one_vs_rest_scores(torch.tensor(logits)).numpy()

    histograms = metrics.score_histograms(scores, targets, num_classes=3)
    pooled = metrics.auc_per_class(histograms)

    for index in range(3):
        exact = metrics.exact_auc(scores[:, index], targets == index)
        assert pooled[index] == pytest.approx(exact, abs=2e-3)
    assert histograms.sum() == 3 * 600


def test_summed_site_histograms_give_the_pooled_auc() -> None:
    generator = np.random.default_rng(1)
    targets = generator.integers(0, 2, size=400)
    scores = generator.normal(size=(400, 2)) + np.eye(2)[targets]
    first, second = slice(0, 150), slice(150, 400)

    summed = (metrics.score_histograms(scores[first], targets[first], 2)
              + metrics.score_histograms(scores[second], targets[second], 2))

    assert np.array_equal(summed, metrics.score_histograms(scores, targets, 2))


def test_macro_auc_skips_classes_without_positives() -> None:
    targets = np.array([0, 0, 1, 1])
    scores = np.array([[2.0, -2.0, 0.0], [1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [-2.0, 2.0, 0.0]])

    histograms = metrics.score_histograms(scores, targets, num_classes=3)

    assert metrics.auc_per_class(histograms) == [1.0, 1.0, None]
    assert metrics.macro_auc(histograms) == 1.0
