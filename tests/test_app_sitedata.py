"""Tests of the app's site data loading on real images from ../shared/data, copied to temp folders.

Each layout (manifest, class folders, MedMNIST .npz), each validation error,
the lesion-leak check and the decode cache.
"""

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

APP_DIR = Path(__file__).resolve().parents[1] / "melody_app"
DERMAMNIST = Path("/work/shared/data/dermamnist28")
HAM_150 = Path("/work/shared/data/ham10000-mel-nv-150")

# The app directory is a Flower app, not an installed package.
sys.path.insert(0, str(APP_DIR))
from skin_lesion import sitedata  # noqa: E402

LABELS = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
SETTINGS = sitedata.DataSettings(labels=LABELS)
SITE = "partition-id=3"
TRAIN, TEST = sitedata.TRAIN_SPLIT, sitedata.TEST_SPLIT

pytestmark = pytest.mark.skipif(
    not (DERMAMNIST / "labels.csv").is_file() or not (HAM_150 / "labels.csv").is_file(),
    reason=f"{DERMAMNIST} or {HAM_150} is not available",
)


def read_rows(source: Path) -> list[dict[str, str]]:
    with (source / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def pick_rows(split: str, per_class: int) -> list[dict[str, str]]:
    """Return the first `per_class` DermaMNIST rows of each class in `split`."""
    picked: dict[str, list[dict[str, str]]] = {label: [] for label in LABELS}
    for row in read_rows(DERMAMNIST):
        if row["split"] == split and len(picked[row["label"]]) < per_class:
            picked[row["label"]].append(row)
    return [row for label in LABELS for row in picked[label]]


def write_manifest(folder: Path, header: list[str], rows: list[list[str]]) -> None:
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_site(folder: Path, rows: list[dict[str, str]], source: Path = DERMAMNIST) -> Path:
    """Copy the images of `rows` from `source` into `folder` and write its labels.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        target = folder / row["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / row["image"], target)
    write_manifest(folder, ["image", "label", "split"],
                   [[row["image"], row["label"], row["split"]] for row in rows])
    return folder


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in folder.rglob("*")}


def load(folder: Path, splits=(TRAIN, TEST), settings=SETTINGS, cache_dir=None):
    return sitedata.load_site(folder, settings, SITE, splits=splits, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def site_rows() -> list[dict[str, str]]:
    """35 train, 14 test and 7 val rows: a balanced few dozen images."""
    return pick_rows("train", 5) + pick_rows("test", 2) + pick_rows("val", 1)


@pytest.fixture
def site_dir(tmp_path: Path, site_rows: list[dict[str, str]]) -> Path:
    return write_site(tmp_path / "site", site_rows)


# The manifest layout


def test_manifest_reads_each_split(site_dir: Path, site_rows) -> None:
    data = load(site_dir)

    assert data.layout == "manifest"
    train_set, test_set = data.splits[TRAIN], data.splits[TEST]
    assert train_set.images.shape == (35, 3, 28, 28)
    assert train_set.images.dtype == torch.uint8
    assert np.bincount(train_set.targets.numpy(), minlength=7).tolist() == [5] * 7
    expected = [LABELS.index(row["label"]) for row in site_rows if row["split"] == "test"]
    assert test_set.targets.tolist() == expected
    assert data.reports[TRAIN].used == 35
    assert data.reports[TEST].used == 14
    assert "train: 35 used, 0 skipped" in data.summary()


def test_manifest_pixels_match_the_source(site_dir: Path, site_rows) -> None:
    train_set = load(site_dir, (TRAIN,)).splits[TRAIN]
    with Image.open(DERMAMNIST / site_rows[0]["image"]) as image:
        expected = np.asarray(image.convert("RGB"), dtype=np.uint8)

    assert np.array_equal(train_set.images[0].permute(1, 2, 0).numpy(), expected)


def test_manifest_column_names_are_settings(site_dir: Path, site_rows) -> None:
    rows = [[r["label"], r["image"], r["split"]] for r in site_rows]
    write_manifest(site_dir, ["diagnosis", "file", "set"], rows)
    settings = sitedata.DataSettings(labels=LABELS, image_column="file",
                                     label_column="diagnosis", split_column="set")

    assert len(load(site_dir, (TRAIN,), settings).splits[TRAIN]) == 35


def test_manifest_without_split_column_splits_by_hash(site_dir: Path, site_rows) -> None:
    write_manifest(site_dir, ["image", "label"], [[r["image"], r["label"]] for r in site_rows])

    first = load(site_dir)
    again = load(site_dir)

    sizes = {split: len(first.splits[split]) for split in (TRAIN, TEST)}
    assert sum(sizes.values()) == len(site_rows)
    assert 0 < sizes[TEST] < sizes[TRAIN]
    # The same rows land in the same split every time, at every site.
    assert torch.equal(first.splits[TEST].images, again.splits[TEST].images)


def test_manifest_accepts_byte_order_mark(site_dir: Path) -> None:
    text = (site_dir / "labels.csv").read_text()
    (site_dir / "labels.csv").write_text("\ufeff" + text, encoding="utf-8")

    assert len(load(site_dir, (TRAIN,)).splits[TRAIN]) == 35


def test_larger_images_are_resized(tmp_path: Path) -> None:
    rows = [row for row in read_rows(HAM_150) if row["split"] == "train"][:4]
    site = write_site(tmp_path / "ham", rows, source=HAM_150)
    settings = sitedata.DataSettings(labels=LABELS, image_size=32)

    assert load(site, (TRAIN,), settings).splits[TRAIN].images.shape == (4, 3, 32, 32)


# The class folder layout


def test_folders_with_split_folders(tmp_path: Path) -> None:
    site = tmp_path / "folders"
    for split, label in [("train", "mel"), ("train", "nv"), ("test", "mel"), ("test", "nv")]:
        source = sorted((HAM_150 / split / label).iterdir())[:3]
        (site / split / label).mkdir(parents=True)
        for path in source:
            shutil.copyfile(path, site / split / label / path.name)
    (site / "train" / "mel" / "notes.txt").write_text("not an image")

    data = load(site)

    assert data.layout == "folders"
    assert len(data.splits[TRAIN]) == 6
    assert len(data.splits[TEST]) == 6
    assert sorted(set(data.splits[TEST].targets.tolist())) == [LABELS.index("mel"),
                                                               LABELS.index("nv")]


def test_folders_without_split_folders(tmp_path: Path, site_rows) -> None:
    site = tmp_path / "classes"
    for row in site_rows:
        (site / row["label"]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DERMAMNIST / row["image"], site / row["label"] / Path(row["image"]).name)

    data = load(site)

    assert len(data.splits[TRAIN]) + len(data.splits[TEST]) == len(site_rows)


def test_folders_outside_the_label_set(tmp_path: Path) -> None:
    (tmp_path / "train" / "melanoma").mkdir(parents=True)
    (tmp_path / "train" / "nv").mkdir(parents=True)

    with pytest.raises(sitedata.SiteDataError) as error:
        load(tmp_path)

    message = str(error.value)
    assert "partition-id=3" in message
    assert "class folder(s) outside the run's label set" in message
    assert "train/melanoma" in message


# The MedMNIST .npz layout


def write_npz(path: Path, rows_by_split: dict[str, list[dict[str, str]]], **extra) -> None:
    arrays = {}
    for split, rows in rows_by_split.items():
        images = [np.asarray(Image.open(DERMAMNIST / row["image"]).convert("RGB"))
                  for row in rows]
        arrays[f"{split}_images"] = np.stack(images).astype(np.uint8)
        arrays[f"{split}_labels"] = np.array([[LABELS.index(row["label"])] for row in rows])
    arrays.update(extra)
    np.savez_compressed(path, **arrays)


def test_npz_layout(tmp_path: Path) -> None:
    write_npz(tmp_path / "dermamnist.npz", {"train": pick_rows("train", 2),
                                           "test": pick_rows("test", 1)})

    data = load(tmp_path)

    assert data.layout == "npz"
    assert data.splits[TRAIN].images.shape == (14, 3, 28, 28)
    assert data.splits[TEST].targets.tolist() == list(range(7))


def test_npz_label_names_map_to_the_run_order(tmp_path: Path) -> None:
    rows = pick_rows("train", 1)
    names = np.array(list(reversed(LABELS)))
    # Labels stored as indices into the file's own reversed name list.
    write_npz(tmp_path / "site.npz", {"train": rows, "test": rows},
              label_names=names)
    arrays = dict(np.load(tmp_path / "site.npz"))
    arrays["train_labels"] = 6 - arrays["train_labels"]
    arrays["test_labels"] = 6 - arrays["test_labels"]
    np.savez(tmp_path / "site.npz", **arrays)

    assert load(tmp_path).splits[TRAIN].targets.tolist() == list(range(7))


def test_npz_label_outside_the_label_set(tmp_path: Path) -> None:
    write_npz(tmp_path / "site.npz", {"train": pick_rows("train", 1),
                                      "test": pick_rows("test", 1)})
    settings = sitedata.DataSettings(labels=("akiec", "bcc"))

    with pytest.raises(sitedata.SiteDataError) as error:
        load(tmp_path, settings=settings)

    message = str(error.value)
    assert "label(s) outside the run's label set akiec,bcc" in message
    assert "train_labels[2]: 2" in message


def test_npz_several_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", train_labels=np.zeros(1))
    np.savez(tmp_path / "b.npz", train_labels=np.zeros(1))

    with pytest.raises(sitedata.SiteDataError, match=r"several \.npz files \(a.npz, b.npz\)"):
        load(tmp_path)


def test_npz_without_splits(tmp_path: Path) -> None:
    np.savez(tmp_path / "site.npz", images=np.zeros((1, 28, 28), dtype=np.uint8))

    with pytest.raises(sitedata.SiteDataError, match="has no train_labels, val_labels"):
        load(tmp_path)


# Validation errors


def test_resolve_data_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(sitedata.SiteDataError, match="partition-id=3: node config key data-dir "
                                                     "is missing"):
        sitedata.resolve_data_dir(None, SITE)
    with pytest.raises(sitedata.SiteDataError, match="data-dir=42 is not a string"):
        sitedata.resolve_data_dir(42, SITE)
    with pytest.raises(sitedata.SiteDataError, match="'data/site0' is not an absolute path"):
        sitedata.resolve_data_dir("data/site0", SITE)
    with pytest.raises(sitedata.SiteDataError, match="is not found or is not a folder"):
        sitedata.resolve_data_dir(str(tmp_path / "nowhere"), SITE)
    assert sitedata.resolve_data_dir(str(tmp_path), SITE) == tmp_path


def test_empty_data_dir(tmp_path: Path) -> None:
    with pytest.raises(sitedata.SiteDataError) as error:
        load(tmp_path)

    assert "contains no labels.csv, no .npz file and no class folders" in str(error.value)


def test_manifest_missing_columns(site_dir: Path) -> None:
    write_manifest(site_dir, ["file", "diagnosis"], [["images/a.jpg", "mel"]])

    with pytest.raises(sitedata.SiteDataError) as error:
        load(site_dir)

    message = str(error.value)
    assert "partition-id=3" in message
    assert "missing the column(s) image, label" in message
    assert "header found: file,diagnosis" in message
    assert "image-column and label-column" in message


def test_manifest_empty_file(site_dir: Path) -> None:
    (site_dir / "labels.csv").write_text("")

    with pytest.raises(sitedata.SiteDataError, match="header found: none"):
        load(site_dir)


def test_manifest_label_outside_the_label_set(site_dir: Path, site_rows) -> None:
    rows = [[r["image"], r["label"], r["split"]] for r in site_rows]
    rows[1][1] = "melanoma"
    write_manifest(site_dir, ["image", "label", "split"], rows)

    with pytest.raises(sitedata.SiteDataError) as error:
        load(site_dir)

    message = str(error.value)
    assert "1 row(s) with a label outside the run's label set akiec,bcc,bkl,df,mel,nv,vasc" \
        in message
    assert "line 3: 'melanoma'" in message


def test_manifest_lists_the_first_bad_rows(site_dir: Path, site_rows) -> None:
    write_manifest(site_dir, ["image", "label", "split"],
                   [[r["image"], "MEL", r["split"]] for r in site_rows])

    with pytest.raises(sitedata.SiteDataError) as error:
        load(site_dir)

    assert f"and {len(site_rows) - sitedata.MAX_LISTED_ROWS} more" in str(error.value)


@pytest.mark.parametrize("image", ["/etc/hostname", "../outside.jpg", ""])
def test_manifest_image_path_outside_data_dir(site_dir: Path, site_rows, image: str) -> None:
    rows = [[r["image"], r["label"], r["split"]] for r in site_rows]
    rows[0][0] = image
    write_manifest(site_dir, ["image", "label", "split"], rows)

    with pytest.raises(sitedata.SiteDataError, match="or one that leaves data-dir: line 2"):
        load(site_dir)


def test_missing_image(site_dir: Path, site_rows) -> None:
    missing = site_dir / site_rows[0]["image"]
    missing.unlink()

    with pytest.raises(sitedata.SiteDataError) as error:
        load(site_dir)

    message = str(error.value)
    assert "partition-id=3: 1 image(s)" in message
    assert f"missing or cannot be read: {missing}" in message


def test_unreadable_image(site_dir: Path, site_rows) -> None:
    corrupt = site_dir / site_rows[2]["image"]
    corrupt.write_bytes(b"not a JPEG file")

    with pytest.raises(sitedata.SiteDataError, match=f"cannot be read: {corrupt}"):
        load(site_dir)


def test_empty_split(site_dir: Path, site_rows) -> None:
    write_manifest(site_dir, ["image", "label", "split"],
                   [[r["image"], r["label"], r["split"]] for r in site_rows
                    if r["split"] != "train"])

    with pytest.raises(sitedata.SiteDataError) as error:
        load(site_dir)

    message = str(error.value)
    assert "partition-id=3" in message
    assert "has no 'train' images" in message
    assert "test (14), val (7)" in message


# The lesion leak in ham10000-mel-nv-150


def test_lesions_never_sit_in_both_splits() -> None:
    rows = read_rows(HAM_150)
    lesion_splits: dict[str, set[str]] = {}
    for row in rows:
        lesion_splits.setdefault(row["lesion_id"], set()).add(row["split"])
    leaked = {lesion for lesion, splits in lesion_splits.items() if len(splits) > 1}
    leaked_train_rows = sum(1 for row in rows
                            if row["lesion_id"] in leaked and row["split"] == "train")
    assert len(leaked) == 200

    # Read in place: the shared folder is read-only and the loader writes nothing.
    settings = sitedata.DataSettings(labels=LABELS, image_size=8)
    data = sitedata.load_site(HAM_150, settings, SITE)

    assert len(data.splits[TEST]) == 1000
    assert len(data.splits[TRAIN]) == 1000 - leaked_train_rows
    assert data.reports[TRAIN].skipped == {
        "with a lesion or patient id also in the test split": leaked_train_rows}
    assert f"{leaked_train_rows} skipped" in data.summary()


def test_assign_splits_keeps_groups_together() -> None:
    entries = [sitedata.Entry(f"{index}.jpg", 0, split, group) for index, (split, group) in
               enumerate([("train", "L1"), ("test", "L1"), ("train", "L2"), ("", "L3"),
                          ("", "L3"), ("test", "L4")])]

    by_split, reports = sitedata._assign_splits(entries, SETTINGS)

    groups = {split: {entry.group for entry in rows} for split, rows in by_split.items()}
    assert not groups[TRAIN] & groups[TEST]
    assert "L1" in groups[TEST]
    assert "L2" in groups[TRAIN]
    assert reports[TRAIN].skipped.total() == 1


# The decode cache


def test_cache_is_reused_and_data_dir_unchanged(site_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before = snapshot(site_dir)

    first = load(site_dir, cache_dir=cache)
    cached_files = sorted(cache.iterdir())
    second = load(site_dir, cache_dir=cache)

    assert len(cached_files) == 2
    assert torch.equal(first.splits[TRAIN].images, second.splits[TRAIN].images)
    assert snapshot(site_dir) == before


def test_cache_follows_changed_images(site_dir: Path, site_rows, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load(site_dir, (TRAIN,), cache_dir=cache)
    changed = site_dir / site_rows[0]["image"]
    Image.new("RGB", (28, 28), (255, 0, 0)).save(changed, format="JPEG")

    reloaded = load(site_dir, (TRAIN,), cache_dir=cache).splits[TRAIN]

    assert reloaded.images[0, 0].float().mean() > 200
    assert len(list(cache.iterdir())) == 2


def test_cache_dir_inside_data_dir_is_refused(site_dir: Path) -> None:
    with pytest.raises(sitedata.SiteDataError, match="is inside data-dir"):
        sitedata.resolve_cache_dir(str(site_dir / "cache"), site_dir, SITE)
    assert not (site_dir / "cache").exists()


def test_cache_dir_defaults_to_the_working_directory(site_dir: Path, tmp_path: Path,
                                                     monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)

    assert sitedata.resolve_cache_dir(None, site_dir, SITE) == tmp_path / "melody-cache"
