"""Model, site data loading, training and evaluation for the skin lesion classifier.

This module has no Flower imports, so it can be tested and used without a
federation. The ClientApp and ServerApp call it for everything but the wiring.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGE_SIZE = 28
MANIFEST_NAME = "labels.csv"
MANIFEST_COLUMNS = ("image", "label", "split")
TRAIN_SPLIT = "train"
TEST_SPLIT = "test"

# How many bad rows an error message lists before it only counts the rest.
MAX_LISTED_ROWS = 5


class SiteDataError(ValueError):
    """Invalid data at a site: the message names the site, the path or value, and the fix."""


@dataclass(frozen=True)
class ImageSet:
    """Decoded images of one split with their class indices."""

    # uint8 pixels, shape (N, 3, IMAGE_SIZE, IMAGE_SIZE): a quarter of the memory of
    # float32. Batches are scaled to [0, 1] when they are used.
    images: torch.Tensor
    targets: torch.Tensor  # int64, shape (N,), indices into the run's label list

    def __len__(self) -> int:
        return int(self.targets.shape[0])


@dataclass(frozen=True)
class Evaluation:
    """Loss and per-class counts of one model on one image set."""

    loss: float  # mean unweighted cross-entropy per image
    num_examples: int
    class_correct: np.ndarray  # int64, correct predictions per class index
    class_total: np.ndarray  # int64, images per class index

    @property
    def accuracy(self) -> float:
        return accuracy(self.class_correct, self.class_total)

    @property
    def balanced_accuracy(self) -> float:
        return balanced_accuracy(self.class_correct, self.class_total)


class Net(nn.Module):
    """Small CNN for IMAGE_SIZE x IMAGE_SIZE RGB images."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 -> 7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Centre the [0, 1] pixel values so the first layer starts near zero mean.
        return self.classifier(self.features(images - 0.5))


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


def pick_device() -> torch.device:
    """Return the CUDA device when CUDA is available to PyTorch, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_data_dir(data_dir: object, site: str) -> Path:
    """Check the node config value `data-dir` and return it as a Path.

    `site` names the SuperNode in error messages, for example "partition-id=0".
    """
    fix = (
        "Start the SuperNode with --node-config 'data-dir=\"/absolute/folder\"' "
        f"naming the folder that contains {MANIFEST_NAME}."
    )
    if data_dir is None or (isinstance(data_dir, str) and not data_dir.strip()):
        raise SiteDataError(f"Site {site}: node config key data-dir is missing. {fix}")
    if not isinstance(data_dir, str):
        raise SiteDataError(
            f"Site {site}: node config value data-dir={data_dir!r} is not a string. {fix}"
        )

    path = Path(data_dir)
    if not path.is_absolute():
        raise SiteDataError(
            f"Site {site}: node config value data-dir={data_dir!r} is not an absolute "
            f"path. {fix}"
        )
    if not path.is_dir():
        raise SiteDataError(
            f"Site {site}: data-dir {path} is not found or is not a folder. {fix}"
        )
    return path


def load_split(data_dir: Path, labels: list[str], split: str, site: str) -> ImageSet:
    """Read the manifest in `data_dir` and decode the images of one split.

    The manifest `labels.csv` has the columns image,label,split, and image
    paths relative to `data_dir`. Rows of other splits are checked too but not
    decoded. Images of any size are converted to RGB and resized to
    IMAGE_SIZE x IMAGE_SIZE. Raises SiteDataError for a missing manifest,
    missing columns, unknown labels, unreadable images or an empty split.
    Nothing is written to `data_dir`.
    """
    rows = _read_manifest(data_dir, labels, site)
    selected = [
        (line, image, label) for line, image, label, row_split in rows if row_split == split
    ]
    if not selected:
        found = Counter(row_split for _, _, _, row_split in rows)
        found_text = ", ".join(f"{name!r} ({count})" for name, count in sorted(found.items()))
        raise SiteDataError(
            f"Site {site}: manifest {data_dir / MANIFEST_NAME} has no rows with "
            f"split {split!r} (splits found: {found_text or 'none'}). Mark the "
            f"images to use with split {split!r}."
        )

    class_index = {name: index for index, name in enumerate(labels)}
    pixels = np.empty((len(selected), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    targets = np.empty(len(selected), dtype=np.int64)
    failures: list[str] = []

    for position, (line, image, label) in enumerate(selected):
        path = data_dir / image
        try:
            pixels[position] = _decode_image(path)
        except (OSError, Image.DecompressionBombError) as error:
            failures.append(f"line {line}: {path} ({error})")
            continue
        targets[position] = class_index[label]

    if failures:
        raise SiteDataError(
            f"Site {site}: {len(failures)} image(s) of split {split!r} in "
            f"{data_dir / MANIFEST_NAME} cannot be read: {_join_first(failures)}. "
            "Fix or remove these rows, or restore the image files."
        )

    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images=images, targets=torch.from_numpy(targets))


def _read_manifest(
    data_dir: Path, labels: list[str], site: str
) -> list[tuple[int, str, str, str]]:
    """Return the manifest rows as (line number, image, label, split), all checked."""
    manifest = data_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise SiteDataError(
            f"Site {site}: manifest {manifest} is not found. Put a {MANIFEST_NAME} with "
            f"the columns {','.join(MANIFEST_COLUMNS)} in data-dir {data_dir}."
        )

    try:
        # utf-8-sig also reads files that a spreadsheet saved with a byte order mark.
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [column for column in MANIFEST_COLUMNS if column not in header]
            if missing:
                raise SiteDataError(
                    f"Site {site}: manifest {manifest} is missing the column(s) "
                    f"{', '.join(missing)} (header found: {','.join(header) or 'none'}). "
                    f"The first line must name the columns {','.join(MANIFEST_COLUMNS)}."
                )
            reader.fieldnames = header
            # line_num counts physical lines, so skipped blank lines keep the numbers right.
            raw_rows = [(reader.line_num, raw) for raw in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SiteDataError(
            f"Site {site}: manifest {manifest} cannot be read ({error}). Save it as a "
            "UTF-8 CSV file readable by the SuperNode's user."
        ) from error

    allowed = set(labels)
    rows: list[tuple[int, str, str, str]] = []
    unknown: list[str] = []
    bad_paths: list[str] = []

    for line, raw in raw_rows:
        image = (raw["image"] or "").strip()
        label = (raw["label"] or "").strip()
        split = (raw["split"] or "").strip()
        if label not in allowed:
            unknown.append(f"line {line}: {label!r}")
        if not image or Path(image).is_absolute():
            bad_paths.append(f"line {line}: {image!r}")
        rows.append((line, image, label, split))

    if unknown:
        raise SiteDataError(
            f"Site {site}: manifest {manifest} has {len(unknown)} row(s) with a label "
            f"outside the run's label set {','.join(labels)}: {_join_first(unknown)}. "
            "Relabel these rows with one of those codes, or remove them."
        )
    if bad_paths:
        raise SiteDataError(
            f"Site {site}: manifest {manifest} has {len(bad_paths)} row(s) with an "
            f"empty or absolute image path: {_join_first(bad_paths)}. Give each image "
            f"as a path relative to {data_dir}."
        )
    return rows


def _join_first(problems: list[str]) -> str:
    """Join the first MAX_LISTED_ROWS problems with "; " and count the rest."""
    text = "; ".join(problems[:MAX_LISTED_ROWS])
    remaining = len(problems) - MAX_LISTED_ROWS
    if remaining > 0:
        text += f"; and {remaining} more"
    return text


def _decode_image(path: Path) -> np.ndarray:
    """Decode one image file into a uint8 array of shape (IMAGE_SIZE, IMAGE_SIZE, 3)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def count_labels(data: ImageSet, num_classes: int) -> np.ndarray:
    """Return the number of images per class index."""
    return np.bincount(data.targets.numpy(), minlength=num_classes).astype(np.int64)


def class_weights(class_counts: np.ndarray) -> torch.Tensor:
    """Return cross-entropy class weights that give each present class equal total weight.

    A present class c gets total / (present_classes * count_c), so the weights
    average to 1 over the images. Absent classes get weight 0 because no target
    uses them. A class with very few images gets a large weight.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


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
) -> float:
    """Train `model` in place with Adam and class-weighted cross-entropy.

    Batches are shuffled and randomly flipped (lesions have no fixed
    orientation) from a generator seeded with `seed`. Returns the mean
    class-weighted training loss per image over all epochs.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs={epochs} and batch_size={batch_size} must both be 1 or more.")

    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    model.train()
    criterion = nn.CrossEntropyLoss(weight=class_weight.to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)

    loss_sum = 0.0
    seen = 0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            indices = order[start : start + batch_size]
            images = _random_flips(_scale(data.images[indices]), generator).to(device)
            targets = data.targets[indices].to(device)

            optimizer.zero_grad()
            loss = criterion(model(images), targets)
            loss.backward()
            optimizer.step()

            loss_sum += loss.item() * len(indices)
            seen += len(indices)
    return loss_sum / seen


def _scale(pixels: torch.Tensor) -> torch.Tensor:
    """Convert uint8 pixels to float32 values in [0, 1]."""
    return pixels.float().div_(255.0)


def _random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image horizontally and vertically with probability 0.5 each, in place."""
    flip_h = torch.rand(images.shape[0], generator=generator) < 0.5
    flip_v = torch.rand(images.shape[0], generator=generator) < 0.5
    images[flip_h] = images[flip_h].flip(-1)
    images[flip_v] = images[flip_v].flip(-2)
    return images


@torch.no_grad()
def evaluate(
    model: nn.Module, data: ImageSet, *, num_classes: int, batch_size: int, device: torch.device
) -> Evaluation:
    """Return the mean unweighted cross-entropy and per-class counts of `model` on `data`."""
    model.to(device)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = 0.0
    predictions = []

    for start in range(0, len(data), batch_size):
        images = _scale(data.images[start : start + batch_size]).to(device)
        targets = data.targets[start : start + batch_size].to(device)
        logits = model(images)
        loss_sum += criterion(logits, targets).item()
        predictions.append(logits.argmax(dim=1).cpu())

    predicted = torch.cat(predictions).numpy()
    correct, total = count_per_class(data.targets.numpy(), predicted, num_classes)
    return Evaluation(
        loss=loss_sum / len(data),
        num_examples=len(data),
        class_correct=correct,
        class_total=total,
    )


def count_per_class(
    targets: np.ndarray, predicted: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (correct predictions, images) per class index, as int64 arrays."""
    targets = np.asarray(targets, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    total = np.bincount(targets, minlength=num_classes)
    correct = np.bincount(targets[predicted == targets], minlength=num_classes)
    return correct.astype(np.int64), total.astype(np.int64)


def accuracy(class_correct: np.ndarray, class_total: np.ndarray) -> float:
    """Return the fraction of correct predictions. Raises ValueError without images."""
    total = int(np.sum(class_total))
    if total == 0:
        raise ValueError("Accuracy is undefined without images.")
    return float(np.sum(class_correct)) / total


def balanced_accuracy(class_correct: np.ndarray, class_total: np.ndarray) -> float:
    """Return the mean recall over the classes that have at least one image.

    Summing the counts of several sites before calling this gives the
    balanced accuracy of the pooled test sets. Raises ValueError without images.
    """
    correct = np.asarray(class_correct, dtype=np.float64)
    total = np.asarray(class_total, dtype=np.float64)
    present = total > 0
    if not present.any():
        raise ValueError("Balanced accuracy is undefined without images.")
    return float(np.mean(correct[present] / total[present]))
