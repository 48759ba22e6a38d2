"""Run artefacts for the researcher: the final model, every round's metrics, a plot.

Written by the ServerApp on the SuperLink host. The plot is drawn with
Pillow, which the SuperNode and SuperLink venvs already have. No Flower imports.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from skin_lesion.task import RunSettings

MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
PLOT_FILE = "curves.png"

# Plot layout in pixels, and one colour per curve.
PANEL_WIDTH, PANEL_HEIGHT, MARGIN = 560, 360, 48
COLOURS = {
    "train_loss": (31, 119, 180),
    "eval_loss": (255, 127, 14),
    "accuracy": (44, 160, 44),
    "balanced_accuracy": (214, 39, 40),
    "macro_auc": (148, 103, 189),
}


@dataclass(frozen=True)
class SavedRun:
    folder: Path
    model: Path
    metrics: Path
    plot: Path

    def as_dict(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.__dict__.items()}


def write_all(
    folder: Path,
    state_dict: dict[str, torch.Tensor],
    settings: RunSettings,
    rounds: list[dict],
    model_bytes: int,
) -> SavedRun:
    """Write model.pt, metrics.json and curves.png into `folder`, creating it.

    model.pt contains the state dict with the label set and settings that
    produced it, so `Net(len(labels), settings["model_width"])` loads it.
    Raises OSError when the folder cannot be written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    saved = SavedRun(folder, folder / MODEL_FILE, folder / METRICS_FILE, folder / PLOT_FILE)

    bundle = {
        "state_dict": {name: tensor.cpu() for name, tensor in state_dict.items()},
        "labels": list(settings.labels),
        "settings": settings.as_dict(),
        "final_metrics": _scalars(rounds[-1]) if rounds else {},
    }
    _atomic(saved.model, lambda path: torch.save(bundle, path))

    summary = {"settings": settings.as_dict(), "model_parameter_bytes": model_bytes,
               "rounds": rounds}
    _atomic(saved.metrics, lambda path: path.write_text(json.dumps(summary, indent=2) + "\n"))
    _atomic(saved.plot, lambda path: plot_rounds(rounds).save(path, format="PNG"))
    return saved


def _atomic(path: Path, write) -> None:
    """Write through a temporary file, so a reader never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def _scalars(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if not isinstance(value, (list, dict))}


def plot_rounds(rounds: list[dict]) -> Image.Image:
    """Draw two panels: losses per round, and accuracy, balanced accuracy and AUC per round."""
    image = Image.new("RGB", (2 * PANEL_WIDTH, PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    losses = ("train_loss", "eval_loss")
    scores = ("accuracy", "balanced_accuracy", "macro_auc")
    loss_values = [entry[key] for entry in rounds for key in losses if entry.get(key) is not None]
    top = max(loss_values, default=1.0) * 1.1 or 1.0
    _panel(draw, rounds, losses, (0, 0), (0.0, top), "loss per round")
    _panel(draw, rounds, scores, (PANEL_WIDTH, 0), (0.0, 1.0), "test metrics per round")
    return image


def _panel(draw, rounds, keys, origin, y_range, title) -> None:
    left, top = origin[0] + MARGIN, origin[1] + MARGIN
    right, bottom = origin[0] + PANEL_WIDTH - MARGIN // 2, origin[1] + PANEL_HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((left, top - 30), title, fill="black")
    low, high = y_range
    count = max(len(rounds), 2)

    def point(index: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * index / (count - 1)
        y = bottom - (bottom - top) * (value - low) / ((high - low) or 1.0)
        return x, y

    # Five labelled ticks on the value axis, and the first and last round on the other.
    for step in range(5):
        value = low + (high - low) * step / 4
        _, y = point(0, value)
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((origin[0] + 4, y - 6), f"{value:.2f}", fill="black")
    draw.text((left, bottom + 6), "round 1", fill="black")
    draw.text((right - 60, bottom + 6), f"round {len(rounds)}", fill="black")

    for position, key in enumerate(keys):
        colour = COLOURS[key]
        points = [point(index, entry[key]) for index, entry in enumerate(rounds)
                  if entry.get(key) is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((left + 8 + 130 * position, top - 16), key.replace("_", " "), fill=colour)
