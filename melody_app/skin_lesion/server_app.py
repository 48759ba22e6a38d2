"""ServerApp: federated averaging of the skin lesion classifier across sites."""

import json
from functools import partial
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from skin_lesion import task

# Scripts find the run's result in `flwr log` output by this prefix.
RESULT_PREFIX = "MELODY_RESULT"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds of FedAvg and print the per-round metrics."""
    num_rounds = int(context.run_config["num-server-rounds"])
    fraction_train = float(context.run_config["fraction-train"])
    min_nodes = int(context.run_config["min-nodes"])
    labels = task.parse_labels(str(context.run_config["labels"]))
    seed = int(context.run_config["seed"])
    # Read here only to reject bad values before any site starts training.
    local_epochs = int(context.run_config["local-epochs"])
    learning_rate = float(context.run_config["learning-rate"])
    batch_size = int(context.run_config["batch-size"])

    _require(num_rounds >= 1, "num-server-rounds", num_rounds, "1 or more")
    _require(
        0.0 < fraction_train <= 1.0,
        "fraction-train",
        fraction_train,
        "greater than 0 and at most 1",
    )
    _require(min_nodes >= 1, "min-nodes", min_nodes, "1 or more")
    _require(local_epochs >= 1, "local-epochs", local_epochs, "1 or more")
    _require(learning_rate > 0.0, "learning-rate", learning_rate, "greater than 0")
    _require(batch_size >= 1, "batch-size", batch_size, "1 or more")

    torch.manual_seed(seed)
    initial_model = task.Net(len(labels))
    log(INFO, "Labels (class index order): %s", ", ".join(labels))

    strategy = FedAvg(
        fraction_train=fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=min_nodes,
        train_metrics_aggr_fn=aggregate_train_metrics,
        evaluate_metrics_aggr_fn=partial(aggregate_evaluate_metrics, labels=labels),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_model.state_dict()),
        num_rounds=num_rounds,
    )

    rounds = summarize_rounds(result, num_rounds)
    for entry in rounds:
        log(INFO, "Round %d summary: %s", entry["round"], json.dumps(entry))
    print(f"{RESULT_PREFIX} {json.dumps({'rounds': rounds})}", flush=True)

    # A round without results means that every sampled site failed, so the run fails too.
    incomplete = [entry["round"] for entry in rounds if None in entry.values()]
    if incomplete:
        raise RuntimeError(
            f"Rounds {incomplete} returned no training or evaluation results from any "
            "site. The site errors are logged above under 'Received error in reply'."
        )


def _require(valid: bool, key: str, value: object, expected: str) -> None:
    if not valid:
        raise ValueError(
            f"Invalid run config value {key}={value!r}: expected {expected}. "
            f"Change it with flwr run --run-config '{key}=...' or in pyproject.toml."
        )


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Log each site's training result and average the loss weighted by `weight_key`."""
    losses = []
    weights = []
    for reply in replies:
        metrics = reply.metric_records["metrics"]
        site_info = reply.config_records.get("site")
        site = site_info["site"] if site_info else "unknown"
        device = site_info["device"] if site_info else "unknown"
        log(
            INFO,
            "\tSite %s trained on %s with %d images: loss %.4f",
            site,
            device,
            int(metrics[weight_key]),
            float(metrics["train-loss"]),
        )
        losses.append(float(metrics["train-loss"]))
        weights.append(float(metrics[weight_key]))

    return MetricRecord(
        {
            "train-loss": float(np.average(losses, weights=weights)),
            weight_key: int(sum(weights)),
        }
    )


def aggregate_evaluate_metrics(
    replies: list[RecordDict], weight_key: str, *, labels: list[str]
) -> MetricRecord:
    """Pool the sites' per-class counts into global accuracy and balanced accuracy.

    The balanced accuracy is the mean per-class recall of the pooled test sets,
    not a mean of the sites' balanced accuracies. The loss is averaged
    weighted by `weight_key`.
    """
    losses = []
    weights = []
    class_correct = np.zeros(len(labels), dtype=np.int64)
    class_total = np.zeros(len(labels), dtype=np.int64)
    for reply in replies:
        metrics = reply.metric_records["metrics"]
        correct = np.asarray(metrics["class-correct"], dtype=np.int64)
        total = np.asarray(metrics["class-total"], dtype=np.int64)
        if total.shape != class_total.shape or correct.shape != class_correct.shape:
            raise ValueError(
                f"A site returned per-class counts for {total.shape[0]} classes, but the "
                f"run has {len(labels)} labels: all sites must run with the same labels."
            )
        class_correct += correct
        class_total += total
        losses.append(float(metrics["eval-loss"]))
        weights.append(float(metrics[weight_key]))

    recall_text = ", ".join(
        f"{name} {correct / total:.3f}" if total else f"{name} (no images)"
        for name, correct, total in zip(labels, class_correct, class_total)
    )
    log(INFO, "\tRecall per class of the pooled test sets: %s", recall_text)
    return MetricRecord(
        {
            "eval-loss": float(np.average(losses, weights=weights)),
            "accuracy": task.accuracy(class_correct, class_total),
            "balanced-accuracy": task.balanced_accuracy(class_correct, class_total),
            weight_key: int(class_total.sum()),
        }
    )


def summarize_rounds(result: Result, num_rounds: int) -> list[dict]:
    """Return one dict per round with the aggregated metrics, None where a round has none."""
    rounds = []
    for server_round in range(1, num_rounds + 1):
        train_metrics = result.train_metrics_clientapp.get(server_round)
        eval_metrics = result.evaluate_metrics_clientapp.get(server_round)
        rounds.append(
            {
                "round": server_round,
                "train_loss": _metric(train_metrics, "train-loss"),
                "num_train_examples": _metric(train_metrics, "num-examples"),
                "eval_loss": _metric(eval_metrics, "eval-loss"),
                "accuracy": _metric(eval_metrics, "accuracy"),
                "balanced_accuracy": _metric(eval_metrics, "balanced-accuracy"),
                "num_examples": _metric(eval_metrics, "num-examples"),
            }
        )
    return rounds


def _metric(record: MetricRecord | None, key: str) -> float | int | None:
    if record is None:
        return None
    return record[key]
