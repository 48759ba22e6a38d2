"""Pilot loop for the DermaMNIST benchmark: prune settings before a full benchmark run.

    .venv/bin/python benchmarks/app_dermamnist_pilot.py NAME fed|central [key=value ...]

It trains on the same shards as benchmarks/app_dermamnist.py with the app's
own task code (task.train, task.train_head in head rounds, task.evaluate).
It aggregates the sites in a plain loop instead of the ServerApp and
ClientApps. It evaluates only every `eval-every` rounds and after the last
one. The last evaluation also scores the pooled log prior scaled by 1,
0.75, 0.5 and 0 (0: no prior), to show how
the evaluation prior trades accuracy against balanced accuracy. With the
defaults its central side gives the benchmark's central figures.

Keys besides the app's run config: eval-every (0), and for `fed` the server
step as the ServerApp does it: server-learning-rate, server-momentum,
batch-norm-statistics (all read from the run config). Run
benchmarks/app_dermamnist.py once first: it writes the shards into
.cache/benchmark-app/data. Each final result is appended to
.cache/benchmark-app/pilots.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import app_dermamnist as bench  # noqa: E402
from skin_lesion import sitedata, task  # noqa: E402

OUT = bench.REPO / ".cache" / "benchmark-app"
PRIOR_SCALES = (1.0, 0.75, 0.5, 0.0)


def average(states: list[dict], weights: np.ndarray, pooled_variance: bool) -> dict:
    """Return the example-weighted average of the sites' state dicts (FedAvg)."""
    averaged = {}
    for key, first in states[0].items():
        value = sum(float(weight) * state[key].double() for weight, state in zip(weights, states))
        if pooled_variance and key.endswith("running_var"):
            mean_key = key[: -len("running_var")] + "running_mean"
            means = [state[mean_key].double() for state in states]
            centre = sum(float(weight) * mean for weight, mean in zip(weights, means))
            value = sum(float(weight) * (state[key].double() + mean ** 2)
                        for weight, state, mean in zip(weights, states, means)) - centre ** 2
        averaged[key] = value if first.is_floating_point() else value.round()
    return averaged


def main() -> int:
    name, side = sys.argv[1], sys.argv[2]
    extra = dict(argument.split("=", 1) for argument in sys.argv[3:])
    eval_every = int(extra.pop("eval-every", 0))
    config = bench.default_run_config()
    config.update(tomllib.loads("\n".join(f"{key}={value}" for key, value in extra.items())))
    settings = task.read_settings(config)
    torch.set_num_threads(1)
    device = torch.device("cpu")

    sites = [sitedata.load_site(OUT / "data" / f"site-{index}", settings.data, f"site-{index}",
                                cache_dir=OUT / "cache") for index in range(3)]
    trains = [site.splits["train"] for site in sites]
    test = sitedata.ImageSet(torch.cat([site.splits["test"].images for site in sites]),
                             torch.cat([site.splits["test"].targets for site in sites]))
    classes = len(settings.labels)
    counts = [task.count_labels(train, classes) for train in trains]
    pooled = sum(counts)
    union = sitedata.ImageSet(torch.cat([train.images for train in trains]),
                              torch.cat([train.targets for train in trains]))

    def evaluate(model: torch.nn.Module, last: bool) -> dict:
        scores = {}
        for scale in PRIOR_SCALES if last else (1.0, 0.0):
            prior = scale * task.log_prior(pooled) if settings.prior_correction else None
            result = task.evaluate(model, test, num_classes=classes, batch_size=256,
                                   device=device, eval_log_prior=prior,
                                   test_time_augmentation=last and settings.test_time_augmentation)
            scores[f"prior x{scale}"] = {"accuracy": round(result.accuracy, 4),
                                         "balanced_accuracy": round(result.balanced_accuracy, 4),
                                         "macro_auc": round(result.macro_auc, 4)}
        return scores

    def report_round(model: torch.nn.Module, server_round: int) -> dict:
        """Print and return the round entry: seconds since the start, and scores every
        `eval-every` rounds and after the last one."""
        entry = {"round": server_round, "seconds": round(time.time() - started)}
        last = server_round == task.total_rounds(settings)
        if last or (eval_every and server_round % eval_every == 0):
            entry["eval"] = evaluate(model, last)
        print(name, side, json.dumps(entry), flush=True)
        return entry

    torch.manual_seed(settings.seed)
    model = task.build_model(settings)
    velocity: dict[str, torch.Tensor] = {}
    started = time.time()
    entry: dict = {}
    for server_round in range(1, settings.num_rounds + 1):
        rate = task.round_learning_rate(settings.learning_rate, server_round, settings.num_rounds)
        options = dict(epochs=settings.local_epochs, learning_rate=rate,
                       batch_size=settings.batch_size, device=device,
                       seed=settings.seed + server_round, optimizer_name=settings.local_optimizer)
        if side == "central":
            task.train(model, union, class_weight=task.class_weights(
                pooled, settings.class_weight_power), train_log_prior=task.log_prior(pooled)
                if settings.prior_correction else None, **options)
        else:
            before = {key: value.detach().clone() for key, value in model.state_dict().items()}
            states = []
            for train, site_counts in zip(trains, counts):
                local = task.build_model(settings)
                local.load_state_dict(before)
                task.train(local, train, class_weight=task.class_weights(
                    site_counts, settings.class_weight_power),
                    train_log_prior=task.log_prior(site_counts)
                    if settings.prior_correction else None,
                    proximal_mu=settings.proximal_mu if settings.strategy == "fedprox" else 0.0,
                    **options)
                states.append(local.state_dict())
            weights = np.array([len(train) for train in trains], dtype=np.float64)
            averaged = average(states, weights / weights.sum(),
                               settings.batch_norm_statistics == "pooled")
            new = {}
            for key, old in before.items():
                value = averaged[key]
                # The server step, as server_app.ServerStep: weights only, not BN statistics.
                if old.is_floating_point() and not key.endswith(("running_mean", "running_var")):
                    update = old.double() - value
                    if settings.server_momentum > 0:
                        if key in velocity:
                            update = settings.server_momentum * velocity[key] + update
                        velocity[key] = update
                    value = old.double() - settings.server_learning_rate * update
                new[key] = value.to(old.dtype)
            model.load_state_dict(new)

        entry = report_round(model, server_round)

    # Head rounds train the final layer alone. The sites' layers are averaged without a server step.
    for server_round in range(settings.num_rounds + 1, task.total_rounds(settings) + 1):
        options = dict(epochs=settings.local_epochs, batch_size=settings.batch_size,
                       learning_rate=task.head_learning_rate(settings, server_round),
                       device=device, seed=settings.seed + server_round)
        if side == "central":
            task.train_head(model, union, class_weight=task.class_weights(
                pooled, settings.class_weight_power), train_log_prior=task.log_prior(pooled)
                if settings.prior_correction else None, **options)
        else:
            heads = []
            for train, site_counts in zip(trains, counts):
                local = task.build_model(settings)
                local.load_state_dict(model.state_dict())
                task.train_head(local, train, class_weight=task.class_weights(
                    site_counts, settings.class_weight_power),
                    train_log_prior=task.log_prior(site_counts)
                    if settings.prior_correction else None, **options)
                heads.append(local.head.state_dict())
            weights = np.array([len(train) for train in trains], dtype=np.float64)
            model.head.load_state_dict({
                key: sum(float(weight) * head[key] for weight, head in zip(weights, heads))
                / weights.sum() for key in heads[0]})

        entry = report_round(model, server_round)

    with (OUT / "pilots.jsonl").open("a") as handle:
        handle.write(json.dumps({"name": name, "side": side, "args": sys.argv[3:],
                                 "final": entry}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
