"""Tests of the ServerApp's metric aggregation with real Flower records, without a federation."""

import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

APP_DIR = Path(__file__).resolve().parents[1] / "melody_app"

# The app directory is a Flower app, not an installed package.
sys.path.insert(0, str(APP_DIR))
from skin_lesion import server_app  # noqa: E402

LABELS = ["mel", "nv"]


def evaluate_reply(loss: float, correct: list[int], total: list[int]) -> RecordDict:
    metrics = MetricRecord(
        {
            "eval-loss": loss,
            "num-examples": sum(total),
            "class-correct": correct,
            "class-total": total,
        }
    )
    return RecordDict({"metrics": metrics, "site": ConfigRecord({"site": "test", "device": "cpu"})})


def train_reply(loss: float, num_examples: int) -> RecordDict:
    metrics = MetricRecord({"train-loss": loss, "num-examples": num_examples})
    return RecordDict({"metrics": metrics, "site": ConfigRecord({"site": "test", "device": "cpu"})})


def test_evaluate_pools_class_counts() -> None:
    # Site A has only mel (recall 0.8), site B only nv (recall 0.25).
    replies = [evaluate_reply(1.0, [8, 0], [10, 0]), evaluate_reply(2.0, [0, 1], [0, 4])]

    metrics = server_app.aggregate_evaluate_metrics(replies, "num-examples", labels=LABELS)

    assert metrics["balanced-accuracy"] == pytest.approx((0.8 + 0.25) / 2)
    assert metrics["accuracy"] == pytest.approx(9 / 14)
    assert metrics["eval-loss"] == pytest.approx((10 * 1.0 + 4 * 2.0) / 14)
    assert metrics["num-examples"] == 14


def test_evaluate_rejects_other_label_count() -> None:
    replies = [evaluate_reply(1.0, [1, 0, 0], [1, 1, 1])]

    with pytest.raises(ValueError, match="counts for 3 classes, but the run has 2 labels"):
        server_app.aggregate_evaluate_metrics(replies, "num-examples", labels=LABELS)


def test_train_loss_weighted_by_examples() -> None:
    replies = [train_reply(1.0, 300), train_reply(2.0, 100)]

    metrics = server_app.aggregate_train_metrics(replies, "num-examples")

    assert metrics["train-loss"] == pytest.approx(1.25)
    assert metrics["num-examples"] == 400
