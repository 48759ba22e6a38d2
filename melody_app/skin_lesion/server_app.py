"""ServerApp: FedAvg, FedProx or FedNova of the skin lesion classifier across sites."""

import json
import time
from logging import ERROR, INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx, Result

from skin_lesion import artefacts, metrics, task

# Scripts find the run's result in `flwr log` output by this prefix.
RESULT_PREFIX = "MELODY_RESULT"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured rounds, print the per-round metrics and save the artefacts."""
    settings = task.read_settings(context.run_config)
    torch.manual_seed(settings.seed)
    initial_model = task.build_model(settings)
    model_bytes = task.parameter_bytes(initial_model)
    log(INFO, "Labels (class index order): %s", ", ".join(settings.labels))
    log(INFO, "Strategy %s, model width %d: %d parameter bytes per site and round",
        settings.strategy, settings.model_width, model_bytes)
    if settings.head_rounds:
        log(INFO, "Rounds %d to %d are head rounds: sites retrain only the final layer",
            settings.num_rounds + 1, task.total_rounds(settings))

    tracker = RoundTracker(list(settings.labels))
    options = dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=settings.min_nodes,
        train_metrics_aggr_fn=tracker.aggregate_train,
        evaluate_metrics_aggr_fn=tracker.aggregate_evaluate,
    )
    server_step = ServerStep(settings.server_learning_rate, settings.server_momentum)
    pooled = settings.batch_norm_statistics == "pooled"
    if settings.strategy == "fedprox":
        strategy = with_class_counts(FedProx, tracker, settings, server_step, pooled)(
            proximal_mu=settings.proximal_mu, **options)
    else:
        strategy = with_class_counts(FedAvg, tracker, settings, server_step, pooled)(**options)
    tracker.start()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_model.state_dict()),
        num_rounds=task.total_rounds(settings),
    )

    rounds = tracker.summarize(result, settings)
    for entry in rounds:
        log(INFO, "Round %d summary: %s", entry["round"], json.dumps(_scalars(entry)))

    # Artefacts go under the working directory unless output-dir is absolute;
    # deployed, that is the SuperLink's state directory.
    run_dir = Path(settings.output_dir) / f"run-{context.run_id}"
    saved = None
    failure = None
    try:
        saved = artefacts.write_all(
            run_dir.resolve(), result.arrays.to_torch_state_dict(), settings, rounds,
            model_bytes,
        )
        log(INFO, "Saved the final model, metrics and plot in %s", saved.folder)
    except OSError as error:
        failure = error
        log(ERROR, "Cannot save the run's artefacts in %s: %s", run_dir.resolve(), error)

    line = {
        "rounds": rounds,
        "strategy": settings.strategy,
        "model_parameter_bytes": model_bytes,
        "artefacts": saved.as_dict() if saved else None,
    }
    print(f"{RESULT_PREFIX} {json.dumps(line)}", flush=True)

    # A round without results means that every sampled site failed, so the run fails too.
    incomplete = [entry["round"] for entry in rounds
                  if entry["train_loss"] is None or entry["accuracy"] is None]
    if incomplete:
        raise RuntimeError(
            f"Rounds {incomplete} returned no training or evaluation results from any "
            "site. The site errors are logged above under 'Received error in reply'."
        )
    if failure is not None:
        raise RuntimeError(
            f"Training finished but the artefacts could not be saved in {run_dir.resolve()} "
            f"({failure}). Set the run config key output-dir to a folder the SuperLink's "
            "user may write."
        )


class ServerStep:
    """Server learning rate and momentum applied to the averaged update (FedAvgM).

    The averaged change of the sites' weights is treated as a gradient:
    momentum keeps moving the model in the direction that several rounds
    agree on, which damps the round-to-round swing that sites with
    different class mixes cause. Batch normalisation statistics are plain
    averages: a momentum step could make a running variance negative.
    """

    def __init__(self, learning_rate: float, momentum: float) -> None:
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.velocity: dict[str, np.ndarray] = {}

    @property
    def active(self) -> bool:
        return self.learning_rate != 1.0 or self.momentum > 0

    def apply(self, previous: ArrayRecord, averaged: ArrayRecord) -> ArrayRecord:
        """Return the new global arrays from the previous ones and the sites' average."""
        before = previous.to_numpy_ndarrays()
        after = averaged.to_numpy_ndarrays()
        stepped = {}
        for key, old, new in zip(averaged.keys(), before, after, strict=True):
            if not np.issubdtype(old.dtype, np.floating) or key.endswith(
                    ("running_mean", "running_var")):
                stepped[key] = Array(np.asarray(new))
                continue
            update = old - new
            if self.momentum > 0:
                if key in self.velocity:
                    update = self.momentum * self.velocity[key] + update
                self.velocity[key] = update
            stepped[key] = Array(np.asarray(old - self.learning_rate * update, dtype=old.dtype))
        return ArrayRecord(stepped)


def pool_batch_norm_variance(contents: list[RecordDict], averaged: ArrayRecord,
                             weight_key: str) -> ArrayRecord:
    """Replace the averaged running variances with those of all sites' features together.

    The plain average of the sites' variances leaves out how far the sites'
    means lie apart, which label skew makes large: the pooled variance is the
    weighted mean of (variance + mean^2), less the square of the pooled mean.
    """
    weights = np.array([float(content.metric_records["metrics"][weight_key])
                        for content in contents])
    weights /= weights.sum()
    sites = [content.array_records["arrays"] for content in contents]
    pooled = {}
    for key, array in averaged.items():
        values = array.numpy()
        if key.endswith("running_var"):
            mean_key = key[: -len("running_var")] + "running_mean"
            means = [site[mean_key].numpy().astype(np.float64) for site in sites]
            second = sum(weight * (site[key].numpy().astype(np.float64) + mean ** 2)
                         for weight, site, mean in zip(weights, sites, means))
            centre = sum(weight * mean for weight, mean in zip(weights, means))
            values = (second - centre ** 2).astype(values.dtype)
        pooled[key] = Array(np.asarray(values))
    return ArrayRecord(pooled)


def normalise_by_local_steps(contents: list[RecordDict], previous: ArrayRecord,
                             averaged: ArrayRecord, weight_key: str) -> ArrayRecord:
    """Replace the averaged weights with FedNova's average of per-step changes.

    Under plain averaging, a site with twice the images takes about twice the
    optimiser steps and also gets twice the weight, so it pulls the model
    about four times as far. A small site that has most images of a rare
    class then counts for little. Here each site's change is divided by its
    steps, the quotients are averaged by example count, and the result is
    scaled by the example-weighted mean step count. Batch normalisation
    statistics and integer buffers keep the plain average.
    """
    weights = np.array([float(content.metric_records["metrics"][weight_key])
                        for content in contents])
    weights /= weights.sum()
    steps = np.array([max(1.0, float(content.metric_records["metrics"]["local-steps"]))
                      for content in contents])
    effective_steps = float(np.sum(weights * steps))
    sites = [content.array_records["arrays"] for content in contents]

    normalised = {}
    for key, array in averaged.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not key.endswith(
                ("running_mean", "running_var")):
            start = previous[key].numpy().astype(np.float64)
            direction = sum(weight / count * (start - site[key].numpy().astype(np.float64))
                            for weight, count, site in zip(weights, steps, sites))
            values = (start - effective_steps * direction).astype(values.dtype)
        normalised[key] = Array(np.asarray(values))
    return ArrayRecord(normalised)


def with_class_counts(strategy_class: type, tracker: "RoundTracker",
                      settings: task.RunSettings, server_step: ServerStep | None = None,
                      pooled_statistics: bool = False) -> type:
    """Return a subclass of `strategy_class` that sends the round's pooled train class counts.

    Sites evaluate with these counts to turn prior-free scores into
    probabilities for the whole federation's class mix. With strategy
    "fednova", the average of a training round is FedNova's. With an active
    `server_step`, training rounds also get the server's momentum step. Head
    rounds keep the plain average, because momentum left over from training
    would keep moving the frozen layers.
    """
    # FedNova is FedAvg with the sites' changes divided by their optimiser steps.
    normalise_steps = settings.strategy == "fednova"

    class WithClassCounts(strategy_class):
        previous: ArrayRecord | None = None

        def configure_train(self, server_round, arrays, config, grid):
            self.previous = arrays
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            arrays, train_metrics = super().aggregate_train(server_round, replies)
            if task.is_head_round(settings, server_round):
                return arrays, train_metrics

            contents = [reply.content for reply in replies if not reply.has_error()]
            if arrays is not None and normalise_steps and self.previous is not None:
                arrays = normalise_by_local_steps(contents, self.previous, arrays,
                                                  self.weighted_by_key)
            if arrays is not None and pooled_statistics:
                arrays = pool_batch_norm_variance(contents, arrays, self.weighted_by_key)
            if arrays is not None and server_step is not None and server_step.active \
                    and self.previous is not None:
                arrays = server_step.apply(self.previous, arrays)
            return arrays, train_metrics

        def configure_evaluate(self, server_round, arrays, config, grid):
            if tracker.class_counts is not None:
                config["train-class-counts"] = [int(count) for count in tracker.class_counts]
            return super().configure_evaluate(server_round, arrays, config, grid)

    WithClassCounts.__name__ = strategy_class.__name__
    return WithClassCounts


def _scalars(entry: dict) -> dict:
    """Return a round entry without its per-site and per-class details, for the log."""
    return {key: value for key, value in entry.items() if key not in ("sites", "confusion")}


class RoundTracker:
    """Aggregates the sites' replies and keeps every round's details for the result.

    The strategy calls aggregate_train and aggregate_evaluate once per round
    with the valid replies; each reply names its round.
    """

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.details: dict[int, dict] = {}
        self.started = 0.0
        self.last_mark = 0.0
        # Train images per class summed over the sites of the latest round.
        self.class_counts: np.ndarray | None = None

    def start(self) -> None:
        self.started = self.last_mark = time.monotonic()

    def aggregate_train(self, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        """Log each site's training result and average the loss weighted by `weight_key`."""
        losses, weights, sites = [], [], []
        server_round = 0
        class_counts = np.zeros(len(self.labels), dtype=np.int64)
        for reply in replies:
            values = reply.metric_records["metrics"]
            counts = np.asarray(values["class-counts"], dtype=np.int64)
            if counts.shape == class_counts.shape:
                class_counts += counts
            site_info = reply.config_records.get("site")
            server_round = int(values["server-round"])
            sent = sum(len(array.data) for array in reply.array_records["arrays"].values())
            site = {
                "site": site_info["site"] if site_info else "unknown",
                "device": site_info["device"] if site_info else "unknown",
                "train_examples": int(values[weight_key]),
                "train_seconds": round(float(values["train-seconds"]), 3),
                "images_per_second": round(float(values["images-per-second"]), 1),
                "sent_array_bytes": sent,
            }
            log(INFO, "\tSite %s trained on %s with %d images: loss %.4f, %.1f images/s, "
                "sent %d array bytes", site["site"], site["device"], site["train_examples"],
                float(values["train-loss"]), site["images_per_second"], sent)
            if site_info and "data" in site_info:
                log(INFO, "\tSite %s data: %s", site["site"], site_info["data"])
            sites.append(site)
            losses.append(float(values["train-loss"]))
            weights.append(float(values[weight_key]))

        self.details.setdefault(server_round, {})["sites"] = sites
        self.class_counts = class_counts
        return MetricRecord(
            {
                "train-loss": float(np.average(losses, weights=weights)),
                weight_key: int(sum(weights)),
            }
        )

    def aggregate_evaluate(self, replies: list[RecordDict], weight_key: str) -> MetricRecord:
        """Pool the sites' confusion matrices and score histograms into the round's metrics.

        Adding counts weights every site by its test images, so the metrics
        are those of all sites' test images together.
        """
        size = len(self.labels)
        confusion = np.zeros((size, size), dtype=np.int64)
        histograms = np.zeros((size, 2, metrics.SCORE_BINS), dtype=np.int64)
        losses, weights = [], []
        server_round = 0
        for reply in replies:
            values = reply.metric_records["metrics"]
            server_round = int(values["server-round"])
            site_confusion = np.asarray(values["confusion"], dtype=np.int64)
            site_histograms = np.asarray(values["score-histograms"], dtype=np.int64)
            if site_confusion.size != confusion.size or site_histograms.size != histograms.size:
                raise ValueError(
                    f"A site returned counts for {int(np.sqrt(site_confusion.size))} classes, "
                    f"but the run has {size} labels: all sites must run with the same labels."
                )
            confusion += site_confusion.reshape(confusion.shape)
            histograms += site_histograms.reshape(histograms.shape)
            losses.append(float(values["eval-loss"]))
            weights.append(float(values[weight_key]))

        recall = metrics.recall_per_class(confusion)
        auc = metrics.macro_auc(histograms)
        now = time.monotonic()
        self.details.setdefault(server_round, {}).update(
            confusion=confusion.tolist(),
            recall=dict(zip(self.labels, recall)),
            auc_per_class=dict(zip(self.labels, metrics.auc_per_class(histograms))),
            round_seconds=round(now - self.last_mark, 2),
        )
        self.last_mark = now
        log(INFO, "\tRecall per class of the pooled test sets: %s", ", ".join(
            f"{name} {value:.3f}" if value is not None else f"{name} (no images)"
            for name, value in zip(self.labels, recall)))
        return MetricRecord(
            {
                "eval-loss": float(np.average(losses, weights=weights)),
                "accuracy": metrics.accuracy(confusion),
                "balanced-accuracy": metrics.balanced_accuracy(confusion),
                "macro-auc": auc if auc is not None else float("nan"),
                weight_key: int(confusion.sum()),
            }
        )

    def summarize(self, result: Result, settings: task.RunSettings) -> list[dict]:
        """Return one dict per round with the aggregated metrics, None where a round has none."""
        rounds = []
        for server_round in range(1, task.total_rounds(settings) + 1):
            train_metrics = result.train_metrics_clientapp.get(server_round)
            eval_metrics = result.evaluate_metrics_clientapp.get(server_round)
            details = self.details.get(server_round, {})
            auc = _metric(eval_metrics, "macro-auc")
            rounds.append(
                {
                    "round": server_round,
                    "head_round": task.is_head_round(settings, server_round),
                    "train_loss": _metric(train_metrics, "train-loss"),
                    "num_train_examples": _metric(train_metrics, "num-examples"),
                    "eval_loss": _metric(eval_metrics, "eval-loss"),
                    "accuracy": _metric(eval_metrics, "accuracy"),
                    "balanced_accuracy": _metric(eval_metrics, "balanced-accuracy"),
                    "macro_auc": None if auc is None or np.isnan(auc) else auc,
                    "num_examples": _metric(eval_metrics, "num-examples"),
                    "round_seconds": details.get("round_seconds"),
                    "recall": details.get("recall"),
                    "auc_per_class": details.get("auc_per_class"),
                    "confusion": details.get("confusion"),
                    "sites": details.get("sites", []),
                }
            )
        return rounds


def _metric(record: MetricRecord | None, key: str) -> float | int | None:
    if record is None:
        return None
    return record[key]
