"""ClientApp: trains and evaluates the global model on one site's images."""

from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from skin_lesion import task

app = ClientApp()


def _site_name(context: Context) -> str:
    """Return the SuperNode's partition-id for logs and errors, or its node id without one."""
    partition_id = context.node_config.get("partition-id")
    if partition_id is None:
        return f"node-id={context.node_id}"
    return f"partition-id={partition_id}"


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on the site's `train` split and return it."""
    site = _site_name(context)
    data_dir = task.resolve_data_dir(context.node_config.get("data-dir"), site)
    labels = task.parse_labels(str(context.run_config["labels"]))
    local_epochs = int(context.run_config["local-epochs"])
    learning_rate = float(context.run_config["learning-rate"])
    batch_size = int(context.run_config["batch-size"])
    seed = int(context.run_config["seed"])
    server_round = int(msg.content["config"]["server-round"])

    train_set = task.load_split(data_dir, labels, task.TRAIN_SPLIT, site)
    class_counts = task.count_labels(train_set, len(labels))
    device = task.pick_device()
    log(
        INFO,
        "Site %s, round %d: training on %s with %d images (per class: %s)",
        site,
        server_round,
        device.type,
        len(train_set),
        ", ".join(f"{name} {count}" for name, count in zip(labels, class_counts)),
    )

    model = task.Net(len(labels))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    train_loss = task.train(
        model,
        train_set,
        epochs=local_epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        class_weight=task.class_weights(class_counts),
        device=device,
        # Vary shuffling and flips between rounds while keeping runs repeatable.
        seed=seed + server_round,
    )
    log(INFO, "Site %s, round %d: training loss %.4f", site, server_round, train_loss)

    metrics = MetricRecord({"train-loss": train_loss, "num-examples": len(train_set)})
    # The ServerApp logs which device and how many images each site used.
    site_info = ConfigRecord({"site": site, "device": device.type})
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": metrics, "site": site_info}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on the site's `test` split and return per-class counts."""
    site = _site_name(context)
    data_dir = task.resolve_data_dir(context.node_config.get("data-dir"), site)
    labels = task.parse_labels(str(context.run_config["labels"]))
    batch_size = int(context.run_config["batch-size"])
    server_round = int(msg.content["config"]["server-round"])

    test_set = task.load_split(data_dir, labels, task.TEST_SPLIT, site)
    device = task.pick_device()
    model = task.Net(len(labels))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    result = task.evaluate(
        model, test_set, num_classes=len(labels), batch_size=batch_size, device=device
    )
    log(
        INFO,
        "Site %s, round %d: evaluated on %s with %d images: loss %.4f, accuracy %.4f, "
        "balanced accuracy %.4f",
        site,
        server_round,
        device.type,
        result.num_examples,
        result.loss,
        result.accuracy,
        result.balanced_accuracy,
    )

    # Per-class counts let the ServerApp compute the balanced accuracy of the
    # pooled test sets, which an average of site balanced accuracies is not.
    metrics = MetricRecord(
        {
            "eval-loss": result.loss,
            "num-examples": result.num_examples,
            "class-correct": [int(count) for count in result.class_correct],
            "class-total": [int(count) for count in result.class_total],
        }
    )
    site_info = ConfigRecord({"site": site, "device": device.type})
    return Message(content=RecordDict({"metrics": metrics, "site": site_info}), reply_to=msg)
