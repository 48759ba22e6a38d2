"""Unit tests of dataset sharding and of the shard files placed on supernodes."""

import csv
import os
import stat

import pytest

from melody_lab.data import DatasetError, labels_columns, read_labels, shard_rows, write_shard


def make_dataset(folder, count=10):
    (folder / "images").mkdir(parents=True)
    with (folder / "labels.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "label", "split"])
        for index in range(count):
            name = f"images/img_{index:03d}.jpg"
            (folder / name).write_bytes(f"image {index}".encode())
            writer.writerow([name, "nv" if index % 2 else "mel", ["train", "val", "test"][index % 3]])
    return folder


def test_shards_are_disjoint_and_complete():
    rows = [{"image": f"images/{index}.jpg"} for index in range(23)]
    shards = [shard_rows(rows, partition, 4) for partition in range(4)]

    images = [row["image"] for shard in shards for row in shard]
    assert len(images) == len(set(images))
    assert sorted(images) == sorted(row["image"] for row in rows)


def test_shard_takes_every_nth_row():
    rows = [{"image": str(index)} for index in range(10)]

    assert [row["image"] for row in shard_rows(rows, 1, 3)] == ["1", "4", "7"]


@pytest.mark.parametrize(("partition", "count"), [(2, 2), (-1, 2)])
def test_shard_rejects_bad_partition(partition, count):
    with pytest.raises(ValueError):
        shard_rows([], partition, count)


def test_read_labels_missing_dataset(tmp_path):
    with pytest.raises(DatasetError, match="dataset not found"):
        read_labels(tmp_path / "absent")


def test_read_labels_rejects_missing_columns(tmp_path):
    (tmp_path / "labels.csv").write_text("file,label\na.jpg,nv\n")

    with pytest.raises(DatasetError, match="expected the columns"):
        read_labels(tmp_path)


@pytest.mark.parametrize("image", ["../outside.jpg", "/etc/passwd", "images/../../x.jpg"])
def test_read_labels_rejects_escaping_paths(tmp_path, image):
    (tmp_path / "labels.csv").write_text(f"image,label,split\n{image},nv,train\n")

    with pytest.raises(DatasetError, match="leaves the dataset folder"):
        read_labels(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="write_shard sets root as owner")
def test_write_shard_files_and_modes(tmp_path):
    dataset = make_dataset(tmp_path / "dataset")
    rows = read_labels(dataset)
    shard = shard_rows(rows, 1, 3)
    target = tmp_path / "host" / "srv" / "melody" / "data"

    write_shard(dataset, shard, target, labels_columns(dataset))

    written = read_labels(target)
    assert written == shard
    assert labels_columns(target) == ["image", "label", "split"]
    assert sorted(path.name for path in (target / "images").iterdir()) == sorted(
        row["image"].split("/")[1] for row in shard)
    for path in [target, target / "images", *target.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert path.stat().st_uid == 0, path
        assert mode == (0o755 if path.is_dir() else 0o644), path


def test_shard_rows_follows_a_site_column():
    rows = [{"image": str(index), "site": str(site)} for index, site in enumerate([2, 0, 0, 1, 2])]

    assert [row["image"] for row in shard_rows(rows, 0, 3)] == ["1", "2"]
    assert [row["image"] for row in shard_rows(rows, 2, 3)] == ["0", "4"]
