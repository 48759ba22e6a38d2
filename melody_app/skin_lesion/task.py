"""Run settings, model, training and evaluation of the skin lesion classifier.

This module has no Flower imports, so it can be tested and used without a
federation (the benchmark trains the central baseline with it). The
ClientApp and ServerApp call it for everything but the wiring.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from skin_lesion import metrics
from skin_lesion.sitedata import DataSettings, ImageSet

STRATEGIES = ("fedavg", "fedprox", "fednova")
NORMS = ("batch", "group")
OPTIMIZERS = ("adamw", "sgd")
BATCH_NORM_STATISTICS = ("average", "pooled")


@dataclass(frozen=True)
class RunSettings:
    """The run config, read once and checked: every site and the ServerApp share it."""

    num_rounds: int
    head_rounds: int
    head_learning_rate: float
    local_epochs: int
    learning_rate: float
    batch_size: int
    fraction_train: float
    min_nodes: int
    labels: tuple[str, ...]
    seed: int
    strategy: str
    proximal_mu: float
    server_learning_rate: float
    server_momentum: float
    local_optimizer: str
    image_size: int
    model_width: int
    norm: str
    batch_norm_statistics: str
    class_weight_power: float
    output_dir: str
    cpu_threads: int
    test_time_augmentation: bool
    prior_correction: bool
    data: DataSettings

    def as_dict(self) -> dict:
        """Return the settings as JSON-ready values, for the saved model and metrics."""
        values = {key: getattr(self, key) for key in self.__dataclass_fields__ if key != "data"}
        values["labels"] = list(self.labels)
        values["data"] = {**self.data.__dict__, "labels": list(self.data.labels)}
        return values


def read_settings(config: Mapping[str, object]) -> RunSettings:
    """Read and check the run config. Raises ValueError naming the key, value and fix."""
    labels = tuple(parse_labels(str(config["labels"])))
    settings = RunSettings(
        num_rounds=int(config["num-server-rounds"]),
        head_rounds=int(config.get("head-rounds", 0)),
        head_learning_rate=float(config.get("head-learning-rate", 0.01)),
        local_epochs=int(config["local-epochs"]),
        learning_rate=float(config["learning-rate"]),
        batch_size=int(config["batch-size"]),
        fraction_train=float(config["fraction-train"]),
        min_nodes=int(config["min-nodes"]),
        labels=labels,
        seed=int(config["seed"]),
        strategy=str(config["strategy"]).strip().lower(),
        proximal_mu=float(config["proximal-mu"]),
        server_learning_rate=float(config.get("server-learning-rate", 1.0)),
        server_momentum=float(config.get("server-momentum", 0.0)),
        local_optimizer=str(config.get("local-optimizer", "adamw")).strip().lower(),
        image_size=int(config["image-size"]),
        model_width=int(config["model-width"]),
        norm=str(config.get("norm", "batch")).strip().lower(),
        batch_norm_statistics=str(config.get("batch-norm-statistics", "average")).strip().lower(),
        class_weight_power=float(config["class-weight-power"]),
        output_dir=str(config["output-dir"]),
        cpu_threads=int(config["cpu-threads"]),
        test_time_augmentation=_flag(config["test-time-augmentation"], "test-time-augmentation"),
        prior_correction=_flag(config["prior-correction"], "prior-correction"),
        data=DataSettings(
            labels=labels,
            image_size=int(config["image-size"]),
            manifest_file=str(config["manifest-file"]),
            image_column=str(config["image-column"]),
            label_column=str(config["label-column"]),
            split_column=str(config["split-column"]),
            group_column=str(config["group-column"]),
            test_fraction=float(config["test-fraction"]),
        ),
    )

    checks = [
        (settings.num_rounds >= 1, "num-server-rounds", settings.num_rounds, "1 or more"),
        (settings.head_rounds >= 0, "head-rounds", settings.head_rounds, "0 (none) or more"),
        (settings.head_learning_rate > 0, "head-learning-rate", settings.head_learning_rate,
         "greater than 0"),
        (settings.local_epochs >= 1, "local-epochs", settings.local_epochs, "1 or more"),
        (settings.learning_rate > 0, "learning-rate", settings.learning_rate, "greater than 0"),
        (settings.batch_size >= 1, "batch-size", settings.batch_size, "1 or more"),
        (0 < settings.fraction_train <= 1, "fraction-train", settings.fraction_train,
         "greater than 0 and at most 1"),
        (settings.min_nodes >= 1, "min-nodes", settings.min_nodes, "1 or more"),
        (settings.strategy in STRATEGIES, "strategy", settings.strategy,
         " or ".join(STRATEGIES)),
        (settings.proximal_mu >= 0, "proximal-mu", settings.proximal_mu, "0 or more"),
        (settings.server_learning_rate > 0, "server-learning-rate",
         settings.server_learning_rate, "greater than 0"),
        (0 <= settings.server_momentum < 1, "server-momentum", settings.server_momentum,
         "0 (none) or more and less than 1"),
        (settings.local_optimizer in OPTIMIZERS, "local-optimizer", settings.local_optimizer,
         " or ".join(OPTIMIZERS)),
        (8 <= settings.image_size <= 224, "image-size", settings.image_size,
         "between 8 and 224 pixels"),
        (1 <= settings.model_width <= 256, "model-width", settings.model_width,
         "between 1 and 256 channels"),
        (settings.norm in NORMS, "norm", settings.norm, " or ".join(NORMS)),
        (settings.batch_norm_statistics in BATCH_NORM_STATISTICS, "batch-norm-statistics",
         settings.batch_norm_statistics, " or ".join(BATCH_NORM_STATISTICS)),
        (0 <= settings.class_weight_power <= 1, "class-weight-power",
         settings.class_weight_power, "between 0 (no weighting) and 1 (balanced)"),
        (0 < settings.data.test_fraction < 1, "test-fraction", settings.data.test_fraction,
         "greater than 0 and less than 1"),
        (bool(settings.output_dir.strip()), "output-dir", settings.output_dir, "a folder path"),
        (settings.cpu_threads >= 0, "cpu-threads", settings.cpu_threads,
         "0 (PyTorch's default) or more"),
    ]
    for valid, key, value, expected in checks:
        if not valid:
            raise ValueError(
                f"Invalid run config value {key}={value!r}: expected {expected}. "
                f"Change it with flwr run --run-config '{key}=...' or in pyproject.toml."
            )
    return settings


def _flag(value: object, key: str) -> bool:
    """Return a boolean run config value; TOML gives bool, --run-config may give a string."""
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "false"):
        return str(value).strip().lower() == "true"
    raise ValueError(
        f"Invalid run config value {key}={value!r}: expected true or false. "
        f"Change it with flwr run --run-config '{key}=...' or in pyproject.toml."
    )


def parse_labels(labels: str) -> list[str]:
    """Split the comma-separated run config value `labels` into the ordered class list.

    The position of a label is its class index, so every site must use the
    same string. Raises ValueError on empty or repeated labels.
    """
    names = [name.strip() for name in labels.split(",")]
    if not labels.strip() or any(not name for name in names):
        raise ValueError(
            f"Invalid run config value labels={labels!r}: expected comma-separated "
            'class codes without empty entries, such as "akiec,bcc,bkl,df,mel,nv,vasc".'
        )

    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(
            f"Invalid run config value labels={labels!r}: repeated labels "
            f"{', '.join(repeated)}. List each class code once."
        )
    return names


def pick_device(cpu_threads: int = 0) -> torch.device:
    """Return the CUDA device when CUDA is available to PyTorch, else the CPU.

    `cpu_threads` > 0 limits PyTorch's CPU threads: on hosts that share few
    cores, fewer threads wait less for each other.
    """
    if cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    """Return "cpu", or "cuda (GPU model)" for logs that name the accelerator of a site."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


# The model


def _normalisation(channels: int, norm: str) -> nn.Module:
    """Return batch normalisation, or group normalisation with 8 channels per group.

    Group normalisation keeps no running statistics: averaging the running
    statistics of sites with different class mixes gives a global model
    whose batch normalisation matches no site's data.
    """
    if norm == "group":
        return nn.GroupNorm(max(1, channels // 8), channels)
    return nn.BatchNorm2d(channels)


def _conv_block(channels_in: int, channels_out: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1, bias=False),
        _normalisation(channels_out, norm),
        nn.ReLU(inplace=True),
    )


class Net(nn.Module):
    """A VGG-style CNN: three stages of two 3x3 convolutions, then global average pooling.

    `width` is the channel count of the first stage; the stages have width,
    2 x width and 4 x width channels. Width 32 has about 0.29 M parameters.
    Global pooling lets the same model take any image size.
    """

    def __init__(self, num_classes: int, width: int = 32, norm: str = "batch") -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(3, width, norm),
            _conv_block(width, width, norm),
            nn.MaxPool2d(2),
            _conv_block(width, 2 * width, norm),
            _conv_block(2 * width, 2 * width, norm),
            nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width, norm),
            _conv_block(4 * width, 4 * width, norm),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(4 * width, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Centre the [0, 1] pixel values so the first layer starts near zero mean.
        return self.classifier(self.features(images - 0.5))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Return the pooled features that the final layer scores."""
        return self.features(images - 0.5).flatten(1)

    @property
    def head(self) -> nn.Linear:
        """The final layer, which head rounds retrain alone."""
        return self.classifier[-1]


def build_model(settings: RunSettings) -> Net:
    return Net(len(settings.labels), settings.model_width, settings.norm)


def parameter_bytes(model: nn.Module) -> int:
    """Return the bytes of the model's state dict arrays, which a site sends each round."""
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())


# Training


def count_labels(data: ImageSet, num_classes: int) -> np.ndarray:
    """Return the number of images per class index."""
    return np.bincount(data.targets.numpy(), minlength=num_classes).astype(np.int64)


def class_weights(class_counts: np.ndarray, power: float) -> torch.Tensor:
    """Return cross-entropy weights proportional to count ** -power, averaging 1 per image.

    Power 0 weights every image the same; power 1 gives every present class
    the same total weight (balanced). Values in between soften the imbalance
    without giving a handful of rare images a huge weight. Absent classes
    get weight 0 because no target uses them.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts[present] ** -power
    weights *= counts.sum() / np.sum(weights * counts)
    return torch.tensor(weights, dtype=torch.float32)


def log_prior(class_counts: np.ndarray) -> torch.Tensor:
    """Return the log of the class frequencies, with absent classes at a frequency of 1e-6."""
    counts = np.asarray(class_counts, dtype=np.float64)
    frequencies = np.maximum(counts / max(counts.sum(), 1.0), 1e-6)
    return torch.tensor(np.log(frequencies), dtype=torch.float32)


def total_rounds(settings: RunSettings) -> int:
    """Return the rounds of a run: the training rounds, then the head rounds."""
    return settings.num_rounds + settings.head_rounds


def is_head_round(settings: RunSettings, server_round: int) -> bool:
    """Return True for the rounds after num-server-rounds, which retrain only the final layer.

    Sites and the ServerApp both decide from the round number, so no extra
    message key is needed.
    """
    return server_round > settings.num_rounds


def head_learning_rate(settings: RunSettings, server_round: int) -> float:
    """Return the learning rate of a head round: a cosine decay over the head rounds alone."""
    return round_learning_rate(settings.head_learning_rate, server_round - settings.num_rounds,
                               settings.head_rounds)


def round_learning_rate(base: float, server_round: int, num_rounds: int) -> float:
    """Return the learning rate of `server_round` (1-based) on a cosine decay to 5 % of `base`.

    Sites compute it from the round number, so the ServerApp sends nothing extra.
    """
    progress = (server_round - 1) / max(num_rounds, 1)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean class-weighted training loss per image
    seconds: float
    images_per_second: float
    steps: int  # optimiser steps taken, so that FedNova can divide the site's change by them


def train(
    model: nn.Module,
    data: ImageSet,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    class_weight: torch.Tensor,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    train_log_prior: torch.Tensor | None = None,
    optimizer_name: str = "adamw",
) -> TrainResult:
    """Train `model` in place with AdamW (or `optimizer_name` "sgd"), class-weighted
    cross-entropy and augmentation.

    With `proximal_mu` > 0 the loss adds mu / 2 times the squared distance of
    the weights from those the model started with (FedProx). Batches are
    shuffled and augmented from a generator seeded with `seed`.

    With `train_log_prior` (the site's log class frequencies) the loss is computed on
    logits + log prior, so the model learns scores free of the site's class
    mix (logit adjustment): sites with different label mixes then pull the
    shared model in less different directions.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must both be 1 or more.")

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    model.train()
    criterion = nn.CrossEntropyLoss(weight=class_weight.to(device))
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9,
                                    nesterov=True, weight_decay=1e-4)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    anchor = [parameter.detach().clone() for parameter in model.parameters()]
    offset = None if train_log_prior is None else train_log_prior.to(device)

    loss_sum = 0.0
    seen = 0
    steps = 0
    for images, targets in _augmented_batches(data, epochs, batch_size, generator, device):
        optimizer.zero_grad()
        logits = model(images)
        if offset is not None:
            logits = logits + offset
        loss = criterion(logits, targets)
        total = loss
        if proximal_mu > 0:
            distance = sum(
                (parameter - start_value).pow(2).sum()
                for parameter, start_value in zip(model.parameters(), anchor)
            )
            total = loss + proximal_mu / 2 * distance
        total.backward()
        optimizer.step()

        loss_sum += loss.item() * len(targets)
        seen += len(targets)
        steps += 1
    seconds = time.perf_counter() - started
    return TrainResult(loss=loss_sum / seen, seconds=seconds, images_per_second=seen / seconds,
                       steps=steps)


def train_head(
    model: Net,
    data: ImageSet,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    class_weight: torch.Tensor,
    device: torch.device,
    seed: int,
    train_log_prior: torch.Tensor | None = None,
) -> TrainResult:
    """Retrain only the final layer of `model`, on features of the frozen rest.

    The rest of the model runs in evaluation mode, so the final layer learns
    from the features that evaluation will see. Those use the averaged batch
    normalisation statistics, which differ from the statistics of the site's
    own label mix under label skew. Batches are augmented as in `train`, and
    `train_log_prior` works as there. Running statistics and every other
    weight stay unchanged.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must both be 1 or more.")

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    model.eval()
    head = model.head
    criterion = nn.CrossEntropyLoss(weight=class_weight.to(device))
    optimizer = torch.optim.Adam(head.parameters(), lr=learning_rate, weight_decay=1e-4)
    offset = None if train_log_prior is None else train_log_prior.to(device)

    loss_sum = 0.0
    seen = 0
    steps = 0
    for images, targets in _augmented_batches(data, epochs, batch_size, generator, device):
        with torch.no_grad():
            features = model.embed(images)

        optimizer.zero_grad()
        logits = head(features)
        if offset is not None:
            logits = logits + offset
        loss = criterion(logits, targets)
        loss.backward()
        optimizer.step()

        loss_sum += loss.item() * len(targets)
        seen += len(targets)
        steps += 1
    seconds = time.perf_counter() - started
    return TrainResult(loss=loss_sum / seen, seconds=seconds, images_per_second=seen / seconds,
                       steps=steps)


def _augmented_batches(data: ImageSet, epochs: int, batch_size: int,
                       generator: torch.Generator, device: torch.device):
    """Yield augmented (images, targets) batches for `epochs` shuffled passes over `data`."""
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        # A last batch of one image would break batch normalisation.
        starts = [start for start in range(0, len(data), batch_size)
                  if len(data) - start > 1 or start == 0]
        for start in starts:
            indices = order[start : start + batch_size]
            images = augment(scale(data.images[indices]), generator).to(device)
            yield images, data.targets[indices].to(device)


def scale(pixels: torch.Tensor) -> torch.Tensor:
    """Convert uint8 pixels to float32 values in [0, 1]."""
    return pixels.float().div_(255.0)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Randomly rotate by multiples of 90 degrees, flip, shift and change brightness.

    Lesions have no fixed orientation, so rotations and flips keep the label.
    """
    count = images.shape[0]
    turns = torch.randint(0, 4, (count,), generator=generator)
    for quarter in range(1, 4):
        chosen = turns == quarter
        if chosen.any():
            images[chosen] = torch.rot90(images[chosen], quarter, dims=(-2, -1))
    flipped = torch.rand(count, generator=generator) < 0.5
    images[flipped] = images[flipped].flip(-1)

    # Shift by up to an eighth of the side, filling with the mirrored border.
    pad = max(1, images.shape[-1] // 8)
    padded = nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator)
    size = images.shape[-1]
    steps = torch.arange(size)
    rows = (offsets[:, 0, None] + steps)[:, None, :, None]
    cols = (offsets[:, 1, None] + steps)[:, None, None, :]
    shifted = padded[torch.arange(count)[:, None, None, None],
                     torch.arange(images.shape[1])[None, :, None, None], rows, cols]

    brightness = 1 + (torch.rand(count, 1, 1, 1, generator=generator) - 0.5) * 0.2
    contrast = 1 + (torch.rand(count, 1, 1, 1, generator=generator) - 0.5) * 0.2
    mean = shifted.mean(dim=(1, 2, 3), keepdim=True)
    return ((shifted - mean) * contrast + mean * brightness).clamp_(0, 1)


# Evaluation


def _orientations(images: torch.Tensor) -> list[torch.Tensor]:
    """Return the 8 quarter-turn and flip versions of a batch of square images."""
    turned = [torch.rot90(images, quarter, dims=(-2, -1)) for quarter in range(4)]
    return turned + [view.flip(-1) for view in turned]


@dataclass(frozen=True)
class Evaluation:
    """Scores of one model on one image set, as counts that sites can add up."""

    loss: float  # mean unweighted cross-entropy per image
    num_examples: int
    confusion: np.ndarray  # int64 (classes, classes): [true, predicted]
    histograms: np.ndarray  # int64 (classes, 2, bins): see metrics.score_histograms

    @property
    def accuracy(self) -> float:
        return metrics.accuracy(self.confusion)

    @property
    def balanced_accuracy(self) -> float:
        return metrics.balanced_accuracy(self.confusion)

    @property
    def macro_auc(self) -> float | None:
        return metrics.macro_auc(self.histograms)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ImageSet,
    *,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    test_time_augmentation: bool = False,
    eval_log_prior: torch.Tensor | None = None,
) -> Evaluation:
    """Return the loss, confusion matrix and score histograms of `model` on `data`.

    With `test_time_augmentation`, the model scores each image in the 8
    orientations of quarter turns and flips, and its log-probabilities are
    averaged: lesions have no fixed orientation, so this costs 8 times the
    compute and no training. `eval_log_prior` (log class frequencies of the
    population tested) is added to the logits of a model trained with
    train_log_prior, which turns its scores back into that population's
    probabilities.
    """
    model.to(device)
    model.eval()
    loss_sum = 0.0
    predictions = []
    scores = []
    offset = 0.0 if eval_log_prior is None else eval_log_prior.to(device)

    for start in range(0, len(data), batch_size):
        images = scale(data.images[start : start + batch_size]).to(device)
        targets = data.targets[start : start + batch_size].to(device)
        views = _orientations(images) if test_time_augmentation else [images]
        log_probabilities = torch.stack(
            [torch.log_softmax(model(view) + offset, dim=1) for view in views]
        ).mean(dim=0)
        loss_sum += nn.functional.nll_loss(log_probabilities, targets, reduction="sum").item()
        predictions.append(log_probabilities.argmax(dim=1).cpu())
        scores.append(metrics.one_vs_rest_scores(log_probabilities).cpu())

    targets = data.targets.numpy()
    return Evaluation(
        loss=loss_sum / len(data),
        num_examples=len(data),
        confusion=metrics.confusion_matrix(targets, torch.cat(predictions).numpy(), num_classes),
        histograms=metrics.score_histograms(torch.cat(scores).numpy(), targets, num_classes),
    )
