"""Read one site's images in the layouts TREs export, check them, and split them.

Three layouts are read from the node config's `data-dir`:

- a CSV manifest (default `labels.csv`) with an image path and a label per row,
  and optionally a split and a patient or lesion id column;
- a folder per class, either at the top (`mel/x.jpg`) or under split folders
  (`train/mel/x.jpg`);
- one MedMNIST-style `.npz` file with `train_images`, `train_labels`,
  `test_images`, `test_labels` (and optionally `val_*` and `label_names`).

Nothing here writes into `data-dir`. Decoded images may be cached in a
separate folder so that later rounds skip the decoding. This module has no
Flower imports.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
TEST_SPLIT = "test"
KNOWN_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
# Bump when the cached arrays change meaning, so old cache files are not reused.
CACHE_VERSION = 1
# How many bad rows an error message lists before it only counts the rest.
MAX_LISTED_ROWS = 5


class SiteDataError(ValueError):
    """Invalid data at a site: the message names the site, the path or value, and the fix."""


@dataclass(frozen=True)
class DataSettings:
    """Run config values that set how every site reads its data."""

    labels: tuple[str, ...]
    image_size: int = 28
    manifest_file: str = "labels.csv"
    image_column: str = "image"
    label_column: str = "label"
    split_column: str = "split"
    group_column: str = "lesion_id"
    # Share of the groups (or images) put in the test split when the data names no split.
    test_fraction: float = 0.2


@dataclass(frozen=True)
class ImageSet:
    """Decoded images of one split with their class indices."""

    # uint8 pixels, shape (N, 3, size, size): a quarter of the memory of
    # float32. Batches are scaled to [0, 1] when they are used.
    images: torch.Tensor
    targets: torch.Tensor  # int64, shape (N,), indices into the run's label list

    def __len__(self) -> int:
        return int(self.targets.shape[0])


@dataclass
class SplitReport:
    """How many images of one split were used, and how many were left out and why."""

    used: int = 0
    skipped: Counter = field(default_factory=Counter)

    def text(self) -> str:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return f"{self.used} used, {sum(self.skipped.values())} skipped" + (
            f" ({reasons})" if reasons else ""
        )


@dataclass(frozen=True)
class Entry:
    """One image of the site: where its pixels come from, its class index, split and group."""

    source: str  # a path relative to data-dir, or "npz:<split>:<index>"
    target: int
    split: str  # "" when the data names no split
    group: str  # lesion or patient id, "" without one


@dataclass(frozen=True)
class SiteData:
    """The requested splits of one site, with the layout read and a report per split."""

    layout: str
    splits: dict[str, ImageSet]
    reports: dict[str, SplitReport]

    def summary(self) -> str:
        parts = [f"{name}: {report.text()}" for name, report in self.reports.items()]
        return f"layout {self.layout}; " + "; ".join(parts)


def resolve_data_dir(data_dir: object, site: str) -> Path:
    """Check the node config value `data-dir` and return it as a Path.

    `site` names the SuperNode in error messages, for example "partition-id=0".
    """
    fix = (
        "Start the SuperNode with --node-config 'data-dir=\"/absolute/folder\"' "
        "naming the folder that holds the site's images."
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


def load_site(
    data_dir: Path,
    settings: DataSettings,
    site: str,
    splits: tuple[str, ...] = (TRAIN_SPLIT, TEST_SPLIT),
    cache_dir: Path | None = None,
) -> SiteData:
    """Read, check, split and decode the site's images for `splits`.

    Raises SiteDataError, naming the site and the fix, for a missing or
    unreadable manifest or image, a manifest without the needed columns, a
    label outside the run's label set, or an empty split.
    """
    layout, entries, npz_path = _read_entries(data_dir, settings, site)
    by_split, reports = _assign_splits(entries, settings)

    decoded = {}
    for split in splits:
        chosen = by_split.get(split, [])
        if not chosen:
            found = ", ".join(f"{name} ({len(rows)})" for name, rows in sorted(by_split.items()))
            raise SiteDataError(
                f"Site {site}: the {layout} data in {data_dir} has no {split!r} images "
                f"(images per split: {found or 'none'}). Give some images the split "
                f"{split!r}, or export more images."
            )
        decoded[split] = _decode_cached(data_dir, chosen, settings, site, npz_path, cache_dir)
    return SiteData(
        layout=layout,
        splits=decoded,
        reports={split: reports[split] for split in splits},
    )


# Reading the layouts


def _read_entries(
    data_dir: Path, settings: DataSettings, site: str
) -> tuple[str, list[Entry], Path | None]:
    """Detect the layout of `data_dir` and return its name, its entries and the .npz file."""
    if (data_dir / settings.manifest_file).is_file():
        return "manifest", _manifest_entries(data_dir, settings, site), None

    npz_files = sorted(data_dir.glob("*.npz"))
    if len(npz_files) > 1:
        names = ", ".join(path.name for path in npz_files)
        raise SiteDataError(
            f"Site {site}: data-dir {data_dir} contains several .npz files ({names}). Keep "
            "one MedMNIST-style file per site, or add a manifest."
        )
    if npz_files:
        return "npz", _npz_entries(npz_files[0], settings, site), npz_files[0]

    folders = sorted(path for path in data_dir.iterdir() if path.is_dir())
    if folders:
        return "folders", _folder_entries(data_dir, folders, settings, site), None

    raise SiteDataError(
        f"Site {site}: data-dir {data_dir} contains no {settings.manifest_file}, no .npz "
        "file and no class folders. Export the images as one of these layouts."
    )


def _manifest_entries(data_dir: Path, settings: DataSettings, site: str) -> list[Entry]:
    manifest = data_dir / settings.manifest_file
    needed = (settings.image_column, settings.label_column)
    try:
        # utf-8-sig also reads files that a spreadsheet saved with a byte order mark.
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [column for column in needed if column not in header]
            if missing:
                raise SiteDataError(
                    f"Site {site}: manifest {manifest} is missing the column(s) "
                    f"{', '.join(missing)} (header found: {','.join(header) or 'none'}). "
                    f"The first line must name the columns {','.join(needed)}, or set "
                    "the run config keys image-column and label-column to its names."
                )
            reader.fieldnames = header
            # line_num counts physical lines, so skipped blank lines keep the numbers right.
            raw_rows = [(reader.line_num, raw) for raw in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SiteDataError(
            f"Site {site}: manifest {manifest} cannot be read ({error}). Save it as a "
            "UTF-8 CSV file readable by the SuperNode's user."
        ) from error

    has_split = settings.split_column in header
    has_group = settings.group_column in header
    class_index = {name: index for index, name in enumerate(settings.labels)}
    entries = []
    unknown = []
    bad_paths = []
    for line, raw in raw_rows:
        image = (raw[settings.image_column] or "").strip()
        label = (raw[settings.label_column] or "").strip()
        split = (raw[settings.split_column] or "").strip() if has_split else ""
        group = (raw[settings.group_column] or "").strip() if has_group else ""
        if label not in class_index:
            unknown.append(f"line {line}: {label!r}")
        if not _is_relative_inside(image):
            bad_paths.append(f"line {line}: {image!r}")
        entries.append(Entry(image, class_index.get(label, -1), split, group))

    if unknown:
        raise SiteDataError(
            f"Site {site}: manifest {manifest} has {len(unknown)} row(s) with a label "
            f"outside the run's label set {','.join(settings.labels)}: "
            f"{_join_first(unknown)}. Relabel these rows with one of those codes, or "
            "remove them."
        )
    if bad_paths:
        raise SiteDataError(
            f"Site {site}: manifest {manifest} has {len(bad_paths)} row(s) with an "
            f"empty or absolute image path, or one that leaves data-dir: "
            f"{_join_first(bad_paths)}. Give each image as a path relative to {data_dir}."
        )
    return entries


def _folder_entries(
    data_dir: Path, folders: list[Path], settings: DataSettings, site: str
) -> list[Entry]:
    """Read `class/x.jpg` or `split/class/x.jpg` folders."""
    names = {folder.name for folder in folders}
    if names <= set(KNOWN_SPLITS):
        class_folders = [
            (split_folder.name, class_folder)
            for split_folder in folders
            for class_folder in sorted(split_folder.iterdir())
            if class_folder.is_dir()
        ]
    else:
        class_folders = [("", folder) for folder in folders]

    class_index = {name: index for index, name in enumerate(settings.labels)}
    unknown = sorted(str(folder.relative_to(data_dir)) for _, folder in class_folders
                     if folder.name not in class_index)
    if unknown:
        raise SiteDataError(
            f"Site {site}: data-dir {data_dir} has class folder(s) outside the run's label "
            f"set {','.join(settings.labels)}: {_join_first(unknown)}. Rename them to "
            "one of those codes, or remove them."
        )

    entries = []
    for split, folder in class_folders:
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                source = str(path.relative_to(data_dir))
                entries.append(Entry(source, class_index[folder.name], split, ""))
    return entries


def _npz_entries(path: Path, settings: DataSettings, site: str) -> list[Entry]:
    arrays = _open_npz(path, site)
    with arrays:
        present = [split for split in KNOWN_SPLITS if f"{split}_labels" in arrays.files]
        if not present:
            raise SiteDataError(
                f"Site {site}: {path} has no train_labels, val_labels or test_labels "
                f"array (arrays found: {', '.join(arrays.files) or 'none'}). Save it "
                "MedMNIST-style with <split>_images and <split>_labels."
            )
        names = None
        if "label_names" in arrays.files:
            names = [str(name) for name in arrays["label_names"]]

        class_index = {name: index for index, name in enumerate(settings.labels)}
        entries = []
        unknown = []
        for split in present:
            if f"{split}_images" not in arrays.files:
                raise SiteDataError(
                    f"Site {site}: {path} has {split}_labels but no {split}_images. Save "
                    "both arrays for every split."
                )
            labels = np.asarray(arrays[f"{split}_labels"]).reshape(-1)
            for index, value in enumerate(labels):
                target = _npz_target(int(value), names, class_index)
                if target is None:
                    unknown.append(f"{split}_labels[{index}]: {int(value)}")
                entries.append(Entry(f"npz:{split}:{index}", -1 if target is None else target,
                                     split, ""))
    if unknown:
        meaning = "names in label_names" if names else "class indices"
        raise SiteDataError(
            f"Site {site}: {path} has {len(unknown)} label(s) outside the run's label set "
            f"{','.join(settings.labels)} (read as {meaning}): {_join_first(unknown)}. "
            "Relabel them, or run with a label set that covers them."
        )
    return entries


def _npz_target(value: int, names: list[str] | None, class_index: dict[str, int]) -> int | None:
    """Map an npz label to the run's class index: by name with label_names, else by index."""
    if names is None:
        return value if 0 <= value < len(class_index) else None
    if not 0 <= value < len(names):
        return None
    return class_index.get(names[value])


def _open_npz(path: Path, site: str):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SiteDataError(
            f"Site {site}: {path} cannot be read as an .npz file ({error}). Export it "
            "again with numpy.savez."
        ) from error


# Splitting


def _assign_splits(
    entries: list[Entry], settings: DataSettings
) -> tuple[dict[str, list[Entry]], dict[str, SplitReport]]:
    """Group entries by split, keeping each lesion or patient on one side of train/test.

    Entries without a split get one from a hash of their group (or their
    image path without a group), so every site and every round splits the
    same way. A group with images in both train and test keeps its test
    images; its train images are skipped.
    """
    assigned = []
    for entry in entries:
        split = entry.split or _hashed_split(entry.group or entry.source, settings.test_fraction)
        assigned.append((split, entry))

    test_groups = {entry.group for split, entry in assigned if split == TEST_SPLIT and entry.group}
    by_split: dict[str, list[Entry]] = {}
    reports: dict[str, SplitReport] = {split: SplitReport() for split in KNOWN_SPLITS}
    for split, entry in assigned:
        report = reports.setdefault(split, SplitReport())
        if split == TRAIN_SPLIT and entry.group in test_groups:
            report.skipped["with a lesion or patient id also in the test split"] += 1
            continue
        report.used += 1
        by_split.setdefault(split, []).append(entry)
    return by_split, reports


def _hashed_split(key: str, test_fraction: float) -> str:
    digest = hashlib.sha256(key.encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return TEST_SPLIT if position < test_fraction else TRAIN_SPLIT


# Decoding, with a cache outside data-dir


def _decode_cached(
    data_dir: Path,
    entries: list[Entry],
    settings: DataSettings,
    site: str,
    npz_path: Path | None,
    cache_dir: Path | None,
) -> ImageSet:
    cache_file = None
    if cache_dir is not None and npz_path is None:
        cache_file = cache_dir / f"{_cache_key(data_dir, entries, settings)}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file) as cached:
                    return _image_set(cached["images"], cached["targets"])
            except (OSError, ValueError, KeyError) as error:
                log.warning("Site %s: ignoring unreadable cache file %s (%s)", site, cache_file,
                            error)

    if npz_path is not None:
        pixels = _decode_npz(npz_path, entries, settings.image_size, site)
    else:
        pixels = _decode_files(data_dir, entries, settings.image_size, site)
    targets = np.asarray([entry.target for entry in entries], dtype=np.int64)

    if cache_file is not None:
        _write_cache(cache_file, pixels, targets, site)
    return _image_set(pixels, targets)


def _image_set(pixels: np.ndarray, targets: np.ndarray) -> ImageSet:
    images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images=images, targets=torch.from_numpy(np.asarray(targets, dtype=np.int64)))


def _decode_files(data_dir: Path, entries: list[Entry], size: int, site: str) -> np.ndarray:
    pixels = np.empty((len(entries), size, size, 3), dtype=np.uint8)
    failures = []
    for position, entry in enumerate(entries):
        path = data_dir / entry.source
        try:
            with Image.open(path) as image:
                pixels[position] = _to_rgb_array(image, size)
        except (OSError, Image.DecompressionBombError) as error:
            failures.append(f"{path} ({error})")
    if failures:
        raise SiteDataError(
            f"Site {site}: {len(failures)} image(s) in {data_dir} are missing or cannot be "
            f"read: {_join_first(failures)}. Restore these files, or remove them from the "
            "export."
        )
    return pixels


def _decode_npz(path: Path, entries: list[Entry], size: int, site: str) -> np.ndarray:
    pixels = np.empty((len(entries), size, size, 3), dtype=np.uint8)
    with _open_npz(path, site) as arrays:
        loaded: dict[str, np.ndarray] = {}
        for position, entry in enumerate(entries):
            _, split, index = entry.source.split(":")
            if split not in loaded:
                loaded[split] = np.asarray(arrays[f"{split}_images"])
            image = loaded[split][int(index)]
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise SiteDataError(
                    f"Site {site}: {path} array {split}_images has dtype {image.dtype} and "
                    f"{image.ndim + 1} dimensions. Save uint8 images shaped (N, H, W) or "
                    "(N, H, W, 3)."
                )
            pixels[position] = _to_rgb_array(Image.fromarray(image), size)
    return pixels


def _to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
    rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(rgb, dtype=np.uint8)


def _cache_key(data_dir: Path, entries: list[Entry], settings: DataSettings) -> str:
    """Hash what the decoded arrays depend on: files, their sizes and times, size and labels."""
    digest = hashlib.sha256()
    header = [CACHE_VERSION, str(data_dir.resolve()), settings.image_size, settings.labels]
    digest.update(json.dumps(header).encode())
    for entry in entries:
        stat = (data_dir / entry.source).stat() if (data_dir / entry.source).exists() else None
        stamp = (stat.st_size, stat.st_mtime_ns) if stat else None
        digest.update(json.dumps([entry.source, entry.target, stamp]).encode())
    return digest.hexdigest()[:32]


def _write_cache(cache_file: Path, pixels: np.ndarray, targets: np.ndarray, site: str) -> None:
    """Write the decoded split atomically; a failure only costs the next round a decode."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, images=pixels, targets=targets)
        os.replace(temporary, cache_file)
    except OSError as error:
        log.warning("Site %s: cannot write the decode cache %s (%s)", site, cache_file, error)


def resolve_cache_dir(cache_dir: object, data_dir: Path, site: str) -> Path | None:
    """Return the decode cache folder: node config `cache-dir`, else ./melody-cache.

    The default is relative to the working directory, which is the
    SuperNode service's state directory when deployed. Returns None (no
    cache) when the folder is inside `data-dir` or cannot be created.
    """
    path = Path(str(cache_dir)) if cache_dir else Path.cwd() / "melody-cache"
    path = path.resolve()
    if path == data_dir.resolve() or data_dir.resolve() in path.parents:
        raise SiteDataError(
            f"Site {site}: cache folder {path} is inside data-dir {data_dir}, which the app "
            "never writes to. Set the node config key cache-dir to a folder outside it."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        log.warning("Site %s: no decode cache, cannot create %s (%s)", site, path, error)
        return None
    if not os.access(path, os.W_OK):
        log.warning("Site %s: no decode cache, %s is not writable", site, path)
        return None
    return path


def _is_relative_inside(image: str) -> bool:
    path = PurePosixPath(image)
    return bool(image) and not path.is_absolute() and ".." not in path.parts


def _join_first(problems: list[str]) -> str:
    """Join the first MAX_LISTED_ROWS problems with "; " and count the rest."""
    text = "; ".join(problems[:MAX_LISTED_ROWS])
    remaining = len(problems) - MAX_LISTED_ROWS
    if remaining > 0:
        text += f"; and {remaining} more"
    return text
