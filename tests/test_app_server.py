"""Tests of the ServerApp's aggregation and artefacts with real Flower records, without a federation."""

import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

APP_DIR = Path(__file__).resolve().parents[1] / "melody_app"

# The app directory is a Flower app, not an installed package.
sys.path.insert(0, str(APP_DIR))
from skin_lesion import artefacts, metrics, server_app, task  # noqa: E402

LABELS = ["mel", "nv"]


def evaluate_reply(loss: float, confusion: list[list[int]], scores: np.ndarray,
                   targets: np.ndarray) -> RecordDict:
    histograms = metrics.score_histograms(scores, targets, len(LABELS))
    values = MetricRecord({
        "eval-loss": loss,
        "num-examples": int(np.sum(confusion)),
        "confusion": [int(count) for count in np.asarray(confusion).reshape(-1)],
        "score-histograms": [int(count) for count in histograms.reshape(-1)],
        "server-round": 1,
    })
    return RecordDict({"metrics": values, "site": ConfigRecord({"site": "a", "device": "cpu"})})


def default_config() -> dict:
    with (APP_DIR / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def train_reply(loss: float, num_examples: int, server_round: int = 1) -> RecordDict:
    values = MetricRecord({"train-loss": loss, "num-examples": num_examples,
                           "server-round": server_round,
                           "train-seconds": 2.0, "images-per-second": num_examples / 2.0,
                           "local-steps": 5, "class-counts": [num_examples, 0]})
    arrays = ArrayRecord({"weight": torch.zeros(10, dtype=torch.float32)})
    return RecordDict({"metrics": values, "arrays": arrays,
                       "site": ConfigRecord({"site": "a", "device": "cpu", "data": "x"})})


def test_evaluate_pools_counts_over_sites() -> None:
    tracker = server_app.RoundTracker(LABELS)
    tracker.start()
    # Site A has only mel (recall 0.8), site B only nv (recall 0.25).
    scores_a, targets_a = np.array([[1.0, -1.0]] * 10), np.zeros(10, dtype=int)
    scores_b, targets_b = np.array([[-1.0, 1.0]] * 4), np.ones(4, dtype=int)
    replies = [evaluate_reply(1.0, [[8, 2], [0, 0]], scores_a, targets_a),
               evaluate_reply(2.0, [[0, 0], [3, 1]], scores_b, targets_b)]

    aggregated = tracker.aggregate_evaluate(replies, "num-examples")

    assert aggregated["balanced-accuracy"] == pytest.approx((0.8 + 0.25) / 2)
    assert aggregated["accuracy"] == pytest.approx(9 / 14)
    assert aggregated["eval-loss"] == pytest.approx((10 * 1.0 + 4 * 2.0) / 14)
    assert aggregated["num-examples"] == 14
    # Every mel image outscores every nv image on mel, and the other way round.
    assert aggregated["macro-auc"] == pytest.approx(1.0)
    details = tracker.details[1]
    assert details["confusion"] == [[8, 2], [3, 1]]
    assert details["recall"] == {"mel": pytest.approx(0.8), "nv": pytest.approx(0.25)}


def test_evaluate_rejects_other_label_count() -> None:
    tracker = server_app.RoundTracker(LABELS)
    reply = evaluate_reply(1.0, [[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.zeros((3, 3)),
                           np.arange(3))

    with pytest.raises(ValueError, match="counts for 3 classes, but the run has 2 labels"):
        tracker.aggregate_evaluate([reply], "num-examples")


def test_train_loss_weighted_and_bytes_counted() -> None:
    tracker = server_app.RoundTracker(LABELS)

    aggregated = tracker.aggregate_train([train_reply(1.0, 300), train_reply(2.0, 100)],
                                         "num-examples")

    assert aggregated["train-loss"] == pytest.approx(1.25)
    assert aggregated["num-examples"] == 400
    sites = tracker.details[1]["sites"]
    assert [site["images_per_second"] for site in sites] == [150.0, 50.0]
    # Ten float32 values, as serialised in the reply's ArrayRecord.
    assert all(site["sent_array_bytes"] >= 40 for site in sites)


def test_artefacts_are_written(tmp_path: Path) -> None:
    with (APP_DIR / "pyproject.toml").open("rb") as handle:
        settings = task.read_settings(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
    model = task.build_model(settings)
    rounds = [{"round": index, "train_loss": 1.0 / index, "eval_loss": 1.2 / index,
               "accuracy": 0.5 + index / 10, "balanced_accuracy": 0.3 + index / 10,
               "macro_auc": 0.7 + index / 20, "sites": []} for index in (1, 2, 3)]

    saved = artefacts.write_all(tmp_path / "run-7", model.state_dict(), settings, rounds, 1234)

    bundle = torch.load(saved.model, weights_only=True)
    assert bundle["labels"] == list(settings.labels)
    assert bundle["settings"]["model_width"] == settings.model_width
    restored = task.Net(len(bundle["labels"]), bundle["settings"]["model_width"],
                        bundle["settings"]["norm"])
    restored.load_state_dict(bundle["state_dict"])
    assert json.loads(saved.metrics.read_text())["rounds"][2]["accuracy"] == pytest.approx(0.8)
    with Image.open(saved.plot) as plot:
        assert plot.format == "PNG"
        assert plot.size == (2 * artefacts.PANEL_WIDTH, artefacts.PANEL_HEIGHT)
        # Curves were drawn: the plot has more colours than black and white.
        assert len(plot.getcolors(maxcolors=100000)) > 2
    assert sorted(path.name for path in saved.folder.iterdir()) == [
        "curves.png", "metrics.json", "model.pt"]


def test_server_momentum_step_by_hand() -> None:
    step = server_app.ServerStep(learning_rate=1.0, momentum=0.5)

    def record(weight: list[float], variance: list[float], count: int) -> ArrayRecord:
        return ArrayRecord({"weight": torch.tensor(weight), "bn.running_var": torch.tensor(variance),
                            "bn.num_batches_tracked": torch.tensor(count)})

    first = step.apply(record([1.0, 1.0], [1.0], 4), record([0.8, 1.2], [0.5], 6))
    # Round 1: the update is the plain average's change, 0.2 and -0.2.
    assert first["weight"].numpy().tolist() == pytest.approx([0.8, 1.2])
    second = step.apply(first, record([0.7, 1.2], [0.4], 8))
    # Round 2: update 0.1 and 0.0, plus half of round 1's 0.2 and -0.2.
    assert second["weight"].numpy().tolist() == pytest.approx([0.6, 1.3])
    # Batch normalisation statistics and counters are the plain average.
    assert second["bn.running_var"].numpy().tolist() == pytest.approx([0.4])
    assert second["bn.num_batches_tracked"].numpy().tolist() == 8


def test_pooled_batch_norm_variance_by_hand() -> None:
    def content(mean: float, variance: float, examples: int) -> RecordDict:
        arrays = ArrayRecord({"bn.running_mean": torch.tensor([mean]),
                              "bn.running_var": torch.tensor([variance]),
                              "weight": torch.tensor([mean])})
        return RecordDict({"arrays": arrays,
                           "metrics": MetricRecord({"num-examples": examples})})

    # Site A: mean 0, variance 1, 3 images; site B: mean 4, variance 1, 1 image.
    contents = [content(0.0, 1.0, 3), content(4.0, 1.0, 1)]
    averaged = ArrayRecord({"bn.running_mean": torch.tensor([1.0]),
                            "bn.running_var": torch.tensor([1.0]),
                            "weight": torch.tensor([1.0])})

    pooled = server_app.pool_batch_norm_variance(contents, averaged, "num-examples")

    # 0.75 * (1 + 0) + 0.25 * (1 + 16) - 1^2 = 4.
    assert pooled["bn.running_var"].numpy().tolist() == pytest.approx([4.0])
    assert pooled["bn.running_mean"].numpy().tolist() == pytest.approx([1.0])
    assert pooled["weight"].numpy().tolist() == pytest.approx([1.0])


def test_head_round_skips_server_momentum(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower stamps each new message with the identity of the task that makes it.
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    config = default_config()
    config.update({"num-server-rounds": 1, "head-rounds": 1, "labels": ",".join(LABELS)})
    settings = task.read_settings(config)
    tracker = server_app.RoundTracker(LABELS)
    step = server_app.ServerStep(learning_rate=1.0, momentum=0.5)
    strategy = server_app.with_class_counts(server_app.FedAvg, tracker, settings, step)(
        train_metrics_aggr_fn=tracker.aggregate_train)

    def replies(server_round: int, weights: list[float]) -> list[Message]:
        request = Message(RecordDict(), dst_node_id=1, message_type="train")
        messages = []
        for weight in weights:
            content = train_reply(1.0, 10, server_round)
            content["arrays"] = ArrayRecord({"weight": torch.tensor([weight])})
            messages.append(Message(content, reply_to=request))
        return messages

    # Training round 1 from 1.0 to the average 0.8: the momentum is still empty.
    strategy.previous = ArrayRecord({"weight": torch.tensor([1.0])})
    first, _ = strategy.aggregate_train(1, replies(1, [0.7, 0.9]))
    assert first["weight"].numpy().tolist() == pytest.approx([0.8])

    # Head round 2 from 0.8 to the average 0.6: a momentum step would give 0.5.
    strategy.previous = first
    second, _ = strategy.aggregate_train(2, replies(2, [0.5, 0.7]))
    assert second["weight"].numpy().tolist() == pytest.approx([0.6])


def test_fednova_average_by_hand() -> None:
    def content(weight: float, variance: float, examples: int, steps: int) -> RecordDict:
        arrays = ArrayRecord({"weight": torch.tensor([weight]),
                              "bn.running_var": torch.tensor([variance])})
        return RecordDict({"arrays": arrays, "metrics": MetricRecord(
            {"num-examples": examples, "local-steps": steps})})

    previous = ArrayRecord({"weight": torch.tensor([1.0]), "bn.running_var": torch.tensor([1.0])})
    # Site A: 3 images, 6 steps, weight 1.0 to 0.4; site B: 1 image, 2 steps, 1.0 to 0.6.
    contents = [content(0.4, 2.0, 3, 6), content(0.6, 4.0, 1, 2)]
    averaged = ArrayRecord({"weight": torch.tensor([0.45]),
                            "bn.running_var": torch.tensor([2.5])})

    normalised = server_app.normalise_by_local_steps(contents, previous, averaged, "num-examples")

    # Per step: A 0.1, B 0.2; averaged 0.75 * 0.1 + 0.25 * 0.2 = 0.125, times the
    # weighted mean of 5 steps: 1.0 - 0.625.
    assert normalised["weight"].numpy().tolist() == pytest.approx([0.375])
    assert normalised["bn.running_var"].numpy().tolist() == pytest.approx([2.5])
