"""ClientApp: trains and evaluates the global model on one site's images."""

from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from skin_lesion import sitedata, task

app = ClientApp()


def _site_name(context: Context) -> str:
    """Return the SuperNode's partition-id for logs and errors, or its node id without one."""
    partition_id = context.node_config.get("partition-id")
    if partition_id is None:
        return f"node-id={context.node_id}"
    return f"partition-id={partition_id}"


def _load_site(
    context: Context, settings: task.RunSettings, site: str, splits: tuple[str, ...]
) -> sitedata.SiteData:
    """Read and check the site's data, using a decode cache outside data-dir."""
    data_dir = sitedata.resolve_data_dir(context.node_config.get("data-dir"), site)
    cache_dir = sitedata.resolve_cache_dir(context.node_config.get("cache-dir"), data_dir, site)
    data = sitedata.load_site(data_dir, settings.data, site, splits=splits, cache_dir=cache_dir)
    log(INFO, "Site %s: %s", site, data.summary())
    return data


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on the site's train split and return it."""
    settings = task.read_settings(context.run_config)
    site = _site_name(context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    # FedProx sends its proximal weight with every round; FedAvg sends none.
    proximal_mu = float(config.get("proximal-mu", 0.0))

    # Both splits are checked before training, so a bad test split fails round 1.
    data = _load_site(context, settings, site, (sitedata.TRAIN_SPLIT, sitedata.TEST_SPLIT))
    train_set = data.splits[sitedata.TRAIN_SPLIT]
    class_counts = task.count_labels(train_set, len(settings.labels))
    device = task.pick_device(settings.cpu_threads)
    log(
        INFO,
        "Site %s, round %d: training on %s with %d images (per class: %s)",
        site,
        server_round,
        task.device_name(device),
        len(train_set),
        ", ".join(f"{name} {count}" for name, count in zip(settings.labels, class_counts)),
    )

    model = task.build_model(settings)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    class_weight = task.class_weights(class_counts, settings.class_weight_power)
    train_log_prior = task.log_prior(class_counts) if settings.prior_correction else None
    # Vary shuffling and augmentation between rounds while keeping runs repeatable.
    seed = settings.seed + server_round
    if task.is_head_round(settings, server_round):
        log(INFO, "Site %s, round %d: head round %d of %d, retraining the final layer only",
            site, server_round, server_round - settings.num_rounds, settings.head_rounds)
        result = task.train_head(
            model, train_set, epochs=settings.local_epochs,
            learning_rate=task.head_learning_rate(settings, server_round),
            batch_size=settings.batch_size,
            class_weight=class_weight, device=device, seed=seed,
            train_log_prior=train_log_prior,
        )
    else:
        result = task.train(
            model,
            train_set,
            epochs=settings.local_epochs,
            learning_rate=task.round_learning_rate(
                settings.learning_rate, server_round, settings.num_rounds
            ),
            batch_size=settings.batch_size,
            class_weight=class_weight,
            device=device,
            seed=seed,
            proximal_mu=proximal_mu,
            train_log_prior=train_log_prior,
            optimizer_name=settings.local_optimizer,
        )
    log(INFO, "Site %s, round %d: training loss %.4f, %.0f images/s", site, server_round,
        result.loss, result.images_per_second)

    metrics = MetricRecord(
        {
            "train-loss": result.loss,
            "num-examples": len(train_set),
            "train-seconds": result.seconds,
            "images-per-second": result.images_per_second,
            "local-steps": result.steps,
            "server-round": server_round,
            "class-counts": [int(count) for count in class_counts],
        }
    )
    # The ServerApp logs which device and how much data each site used.
    site_info = ConfigRecord(
        {"site": site, "device": task.device_name(device), "data": data.summary()}
    )
    content = RecordDict(
        {"arrays": ArrayRecord(_cpu_state(model)), "metrics": metrics, "site": site_info}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the site's test split and return summable counts."""
    settings = task.read_settings(context.run_config)
    site = _site_name(context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    # Class counts of all sites' train splits in this round, sent by the ServerApp.
    counts = config.get("train-class-counts")
    eval_log_prior = None
    if settings.prior_correction and counts:
        eval_log_prior = task.log_prior(np.asarray(counts))

    data = _load_site(context, settings, site, (sitedata.TEST_SPLIT,))
    test_set = data.splits[sitedata.TEST_SPLIT]
    device = task.pick_device(settings.cpu_threads)
    model = task.build_model(settings)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    result = task.evaluate(
        model,
        test_set,
        num_classes=len(settings.labels),
        batch_size=256,
        device=device,
        test_time_augmentation=settings.test_time_augmentation,
        eval_log_prior=eval_log_prior,
    )
    log(
        INFO,
        "Site %s, round %d: evaluated on %s with %d images: loss %.4f, accuracy %.4f, "
        "balanced accuracy %.4f",
        site,
        server_round,
        task.device_name(device),
        result.num_examples,
        result.loss,
        result.accuracy,
        result.balanced_accuracy,
    )

    # Counts, not ratios: the ServerApp adds them up over sites, which gives
    # the metrics of the pooled test sets.
    metrics = MetricRecord(
        {
            "eval-loss": result.loss,
            "num-examples": result.num_examples,
            "confusion": [int(count) for count in result.confusion.reshape(-1)],
            "score-histograms": [int(count) for count in result.histograms.reshape(-1)],
            "server-round": server_round,
        }
    )
    site_info = ConfigRecord({"site": site, "device": task.device_name(device)})
    return Message(content=RecordDict({"metrics": metrics, "site": site_info}), reply_to=msg)
