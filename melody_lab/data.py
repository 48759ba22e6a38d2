"""Split the image dataset into one shard per supernode and place each shard on its host.

The lab plays the hospital's data export here: every supernode host finds its
own shard at /srv/melody/data as `labels.csv` plus the images that it names.
"""

import csv
import logging
import os
import shutil
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
COLUMNS = ["image", "label", "split"]
# Optional column that names the supernode (partition id) that gets each row.
SITE_COLUMN = "site"


class DatasetError(RuntimeError):
    """The dataset is missing or does not have the expected layout."""


def read_labels(dataset: Path) -> list[dict[str, str]]:
    """Read and check the dataset's labels.csv, returning its rows in file order."""
    labels = dataset / LABELS_FILE
    if not labels.is_file():
        raise DatasetError(f"dataset not found: {labels} does not exist; pass the folder with --dataset")

    with labels.open(newline="") as stream:
        reader = csv.DictReader(stream)
        if reader.fieldnames is None or not set(COLUMNS) <= set(reader.fieldnames):
            raise DatasetError(f"invalid {labels}: expected the columns {','.join(COLUMNS)}, found {reader.fieldnames}")
        rows = list(reader)

    for number, row in enumerate(rows, start=2):
        image = PurePosixPath(row["image"])
        # An image path must stay inside the dataset, because it also names
        # where the copy lands on the host.
        if image.is_absolute() or ".." in image.parts or not image.parts:
            raise DatasetError(f"invalid {labels} line {number}: image path {row['image']!r} leaves the dataset folder")
    return rows


def shard_rows(rows: list[dict[str, str]], partition_id: int, num_partitions: int) -> list[dict[str, str]]:
    """Return shard `partition_id` of `num_partitions`.

    A dataset with a `site` column (the app benchmark writes one for its label
    skew) gives each supernode the rows that name its partition id; otherwise
    shard k contains the rows whose index modulo n is k.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"invalid partition {partition_id} of {num_partitions}")
    if rows and rows[0].get(SITE_COLUMN, "") != "":
        return [row for row in rows if row[SITE_COLUMN] == str(partition_id)]
    return [row for index, row in enumerate(rows) if index % num_partitions == partition_id]


def write_shard(dataset: Path, rows: list[dict[str, str]], target: Path, columns: list[str]) -> None:
    """Write `rows` as labels.csv and copy the images they name into `target`.

    Everything is owned by root and readable by all but writable by root only,
    as a read-only export would be.
    """
    target.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(target, 0o755)

    for row in rows:
        destination = target / row["image"]
        destination.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.copyfile(dataset / row["image"], destination)
        os.chmod(destination, 0o644)

    labels = target / LABELS_FILE
    with labels.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.chmod(labels, 0o644)

    # Folders made by mkdir above follow this process's umask, so their mode
    # is set here for every folder under the target.
    for folder, _, _ in os.walk(target):
        os.chmod(folder, 0o755)
        os.chown(folder, 0, 0)
        for name in os.listdir(folder):
            os.chown(os.path.join(folder, name), 0, 0, follow_symlinks=False)


def labels_columns(dataset: Path) -> list[str]:
    """Return the header of the dataset's labels.csv, so shards keep every column."""
    with (dataset / LABELS_FILE).open(newline="") as stream:
        return next(csv.reader(stream))
