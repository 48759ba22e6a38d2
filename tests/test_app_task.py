"""Tests of the training app's task module on real DermaMNIST images copied to a temp folder."""

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

APP_DIR = Path(__file__).resolve().parents[1] / "melody_app"
DERMAMNIST = Path("/work/shared/data/dermamnist28")
HAM_150 = Path("/work/shared/data/ham10000-mel-nv-150")

# The app directory is a Flower app, not an installed package.
sys.path.insert(0, str(APP_DIR))
from skin_lesion import task  # noqa: E402

LABELS = task.parse_labels("akiec,bcc,bkl,df,mel,nv,vasc")
SITE = "partition-id=3"

pytestmark = pytest.mark.skipif(
    not (DERMAMNIST / "labels.csv").is_file(), reason=f"{DERMAMNIST} is not available"
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


def write_site(folder: Path, rows: list[dict[str, str]], source: Path = DERMAMNIST) -> Path:
    """Copy the images of `rows` from `source` into `folder` and write its labels.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        target = folder / row["image"]
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / row["image"], target)
    manifest_rows = [[row["image"], row["label"], row["split"]] for row in rows]
    write_manifest(folder, ["image", "label", "split"], manifest_rows)
    return folder


def write_manifest(folder: Path, header: list[str], rows: list[list[str]]) -> None:
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def site_rows() -> list[dict[str, str]]:
    """35 train, 14 test and 7 val rows: a balanced few dozen images."""
    return pick_rows("train", 5) + pick_rows("test", 2) + pick_rows("val", 1)


@pytest.fixture
def site_dir(tmp_path: Path, site_rows: list[dict[str, str]]) -> Path:
    return write_site(tmp_path / "site", site_rows)


# Loading a site's data


def test_load_split_reads_train_images(site_dir: Path) -> None:
    train_set = task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)

    assert len(train_set) == 35
    assert train_set.images.shape == (35, 3, 28, 28)
    assert train_set.images.dtype == torch.uint8
    assert train_set.targets.dtype == torch.int64
    assert task.count_labels(train_set, len(LABELS)).tolist() == [5] * 7


def test_load_split_maps_labels_to_run_order(site_dir: Path) -> None:
    test_set = task.load_split(site_dir, LABELS, task.TEST_SPLIT, SITE)
    expected = [LABELS.index(row["label"]) for row in pick_rows("test", 2)]

    assert test_set.targets.tolist() == expected


def test_load_split_matches_source_pixels(site_dir: Path, site_rows: list[dict[str, str]]) -> None:
    from PIL import Image

    train_set = task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)
    with Image.open(DERMAMNIST / site_rows[0]["image"]) as image:
        expected = np.asarray(image.convert("RGB"), dtype=np.uint8)

    actual = train_set.images[0].permute(1, 2, 0).numpy()
    assert np.array_equal(actual, expected)


def test_load_split_skips_other_splits(site_dir: Path) -> None:
    train_set = task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)
    test_set = task.load_split(site_dir, LABELS, task.TEST_SPLIT, SITE)

    # The 7 val rows belong to neither split.
    assert len(train_set) + len(test_set) == 49


def test_load_split_resizes_larger_images(tmp_path: Path) -> None:
    rows = [row for row in read_rows(HAM_150) if row["split"] == "train"][:4]
    if len(rows) < 4:
        pytest.skip(f"{HAM_150} is not available")
    site = write_site(tmp_path / "ham", rows, source=HAM_150)

    train_set = task.load_split(site, LABELS, task.TRAIN_SPLIT, SITE)

    assert train_set.images.shape == (4, 3, 28, 28)


def test_load_split_accepts_byte_order_mark(site_dir: Path) -> None:
    text = (site_dir / "labels.csv").read_text()
    (site_dir / "labels.csv").write_text("\ufeff" + text, encoding="utf-8")

    assert len(task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)) == 35


def test_load_split_leaves_data_dir_unchanged(site_dir: Path) -> None:
    def snapshot() -> dict[str, tuple[int, int]]:
        return {
            str(path.relative_to(site_dir)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in site_dir.rglob("*")
        }

    before = snapshot()
    task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)
    task.load_split(site_dir, LABELS, task.TEST_SPLIT, SITE)

    assert snapshot() == before


# Validation errors


def test_resolve_data_dir_missing() -> None:
    with pytest.raises(task.SiteDataError) as error:
        task.resolve_data_dir(None, SITE)

    message = str(error.value)
    assert "partition-id=3" in message
    assert "data-dir is missing" in message
    assert "--node-config" in message


def test_resolve_data_dir_empty_string() -> None:
    with pytest.raises(task.SiteDataError, match="data-dir is missing"):
        task.resolve_data_dir("  ", SITE)


def test_resolve_data_dir_not_string() -> None:
    with pytest.raises(task.SiteDataError, match="data-dir=42 is not a string"):
        task.resolve_data_dir(42, SITE)


def test_resolve_data_dir_relative() -> None:
    with pytest.raises(task.SiteDataError) as error:
        task.resolve_data_dir("data/site0", SITE)

    message = str(error.value)
    assert "data-dir='data/site0' is not an absolute path" in message
    assert "partition-id=3" in message


def test_resolve_data_dir_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(task.SiteDataError) as error:
        task.resolve_data_dir(str(missing), SITE)

    assert f"data-dir {missing} is not found" in str(error.value)


def test_resolve_data_dir_returns_path(site_dir: Path) -> None:
    assert task.resolve_data_dir(str(site_dir), SITE) == site_dir


def test_load_split_manifest_missing(tmp_path: Path) -> None:
    with pytest.raises(task.SiteDataError) as error:
        task.load_split(tmp_path, LABELS, task.TRAIN_SPLIT, SITE)

    message = str(error.value)
    assert f"manifest {tmp_path / 'labels.csv'} is not found" in message
    assert "partition-id=3" in message
    assert "image,label,split" in message


def test_load_split_missing_columns(site_dir: Path) -> None:
    write_manifest(site_dir, ["image", "diagnosis"], [["images/a.jpg", "mel"]])

    with pytest.raises(task.SiteDataError) as error:
        task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)

    message = str(error.value)
    assert "missing the column(s) label, split" in message
    assert "header found: image,diagnosis" in message


def test_load_split_empty_manifest(site_dir: Path) -> None:
    (site_dir / "labels.csv").write_text("")

    with pytest.raises(task.SiteDataError, match="header found: none"):
        task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)


def test_load_split_unknown_label(site_dir: Path, site_rows: list[dict[str, str]]) -> None:
    rows = [[r["image"], r["label"], r["split"]] for r in site_rows]
    rows[1][1] = "melanoma"
    write_manifest(site_dir, ["image", "label", "split"], rows)

    with pytest.raises(task.SiteDataError) as error:
        task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)

    message = str(error.value)
    assert "1 row(s) with a label outside the run's label set" in message
    assert "line 3: 'melanoma'" in message
    assert "akiec,bcc,bkl,df,mel,nv,vasc" in message


def test_load_split_line_numbers_count_blank_lines(site_dir: Path) -> None:
    rows = pick_rows("train", 1)
    text = "image,label,split\n\n" + f"{rows[0]['image']},melanoma,train\n"
    (site_dir / "labels.csv").write_text(text)

    with pytest.raises(task.SiteDataError, match="line 3: 'melanoma'"):
        task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)


def test_load_split_lists_first_unknown_labels(
    site_dir: Path, site_rows: list[dict[str, str]]
) -> None:
    rows = [[r["image"], "MEL", r["split"]] for r in site_rows]
    write_manifest(site_dir, ["image", "label", "split"], rows)

    with pytest.raises(task.SiteDataError) as error:
        task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)

    message = str(error.value)
    assert f"{len(rows)} row(s)" in message
    assert f"and {len(rows) - task.MAX_LISTED_ROWS} more" in message


def test_load_split_absolute_image_path(site_dir: Path, site_rows: list[dict[str, str]]) -> None:
    rows = [[r["image"], r["label"], r["split"]] for r in site_rows]
    rows[0][0] = str(site_dir / rows[0][0])
    write_manifest(site_dir, ["image", "label", "split"], rows)

    with pytest.raises(task.SiteDataError, match="empty or absolute image path: line 2"):
        task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)


def test_load_split_missing_image(site_dir: Path, site_rows: list[dict[str, str]]) -> None:
    missing = site_dir / site_rows[0]["image"]
    missing.unlink()

    with pytest.raises(task.SiteDataError) as error:
        task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)

    message = str(error.value)
    assert "1 image(s) of split 'train'" in message
    assert f"line 2: {missing}" in message
    assert "partition-id=3" in message


def test_load_split_corrupt_image(site_dir: Path, site_rows: list[dict[str, str]]) -> None:
    corrupt = site_dir / site_rows[2]["image"]
    corrupt.write_bytes(b"not a JPEG file")

    with pytest.raises(task.SiteDataError) as error:
        task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)

    assert f"line 4: {corrupt}" in str(error.value)
    assert "cannot be read" in str(error.value)


def test_load_split_corrupt_image_in_other_split(
    site_dir: Path, site_rows: list[dict[str, str]]
) -> None:
    # Only the requested split is decoded, so a bad test image does not stop training.
    test_row = next(row for row in site_rows if row["split"] == "test")
    (site_dir / test_row["image"]).write_bytes(b"not a JPEG file")

    assert len(task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)) == 35
    with pytest.raises(task.SiteDataError, match="split 'test'"):
        task.load_split(site_dir, LABELS, task.TEST_SPLIT, SITE)


def test_load_split_empty_train_split(site_dir: Path, site_rows: list[dict[str, str]]) -> None:
    rows = [[r["image"], r["label"], r["split"]] for r in site_rows if r["split"] != "train"]
    write_manifest(site_dir, ["image", "label", "split"], rows)

    with pytest.raises(task.SiteDataError) as error:
        task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)

    message = str(error.value)
    assert "no rows with split 'train'" in message
    assert "'test' (14), 'val' (7)" in message
    assert "partition-id=3" in message


def test_parse_labels_strips_spaces() -> None:
    assert task.parse_labels(" mel, nv ") == ["mel", "nv"]


@pytest.mark.parametrize("labels", ["", "mel,,nv", "mel,"])
def test_parse_labels_rejects_empty(labels: str) -> None:
    with pytest.raises(ValueError, match="without empty entries"):
        task.parse_labels(labels)


def test_parse_labels_rejects_repeats() -> None:
    with pytest.raises(ValueError, match="repeated labels mel"):
        task.parse_labels("mel,nv,mel")


# Metrics


def test_count_per_class_by_hand() -> None:
    targets = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 2])

    correct, total = task.count_per_class(targets, predicted, num_classes=4)

    assert correct.tolist() == [2, 1, 1, 0]
    assert total.tolist() == [3, 2, 1, 0]


def test_balanced_accuracy_by_hand() -> None:
    # Recalls are 2/3, 1/2 and 1/1. Class 3 has no images, so it is left out.
    correct = np.array([2, 1, 1, 0])
    total = np.array([3, 2, 1, 0])

    assert task.balanced_accuracy(correct, total) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert task.accuracy(correct, total) == pytest.approx(4 / 6)


def test_balanced_accuracy_all_majority_class() -> None:
    # Predicting the majority class everywhere: 90 % accuracy, 50 % balanced accuracy.
    correct = np.array([90, 0])
    total = np.array([90, 10])

    assert task.accuracy(correct, total) == pytest.approx(0.9)
    assert task.balanced_accuracy(correct, total) == pytest.approx(0.5)


def test_balanced_accuracy_pooled_differs_from_site_mean() -> None:
    site_a = (np.array([8, 0]), np.array([10, 0]))  # only class 0: recall 0.8
    site_b = (np.array([0, 1]), np.array([0, 4]))  # only class 1: recall 0.25
    pooled = task.balanced_accuracy(site_a[0] + site_b[0], site_a[1] + site_b[1])

    assert pooled == pytest.approx((0.8 + 0.25) / 2)
    assert task.balanced_accuracy(*site_a) == pytest.approx(0.8)

    # The example-weighted mean of site values is a different number.
    weighted_mean = (10 * 0.8 + 4 * 0.25) / 14
    assert pooled != pytest.approx(weighted_mean)


def test_balanced_accuracy_without_images() -> None:
    with pytest.raises(ValueError, match="undefined without images"):
        task.balanced_accuracy(np.zeros(3), np.zeros(3))


def test_class_weights_by_hand() -> None:
    # 8 images over 2 present classes: 8 / (2 * 6) and 8 / (2 * 2).
    weights = task.class_weights(np.array([6, 2, 0]))

    assert weights.tolist() == pytest.approx([2 / 3, 2.0, 0.0])


# Model, training and evaluation


def test_net_output_shape() -> None:
    model = task.Net(len(LABELS))

    assert model(torch.zeros(5, 3, 28, 28)).shape == (5, 7)


def test_evaluate_counts_match_labels(site_dir: Path) -> None:
    test_set = task.load_split(site_dir, LABELS, task.TEST_SPLIT, SITE)
    torch.manual_seed(0)

    model = task.Net(len(LABELS))

    result = task.evaluate(
        model, test_set, num_classes=len(LABELS), batch_size=4, device=torch.device("cpu")
    )

    assert result.num_examples == 14
    assert result.class_total.tolist() == [2] * 7
    assert 0 <= result.class_correct.sum() <= 14
    assert np.isfinite(result.loss)
    assert 0.0 <= result.balanced_accuracy <= 1.0


def test_train_lowers_loss(site_dir: Path) -> None:
    train_set = task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)
    weights = task.class_weights(task.count_labels(train_set, len(LABELS)))
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = task.Net(len(LABELS))

    before = task.evaluate(model, train_set, num_classes=len(LABELS), batch_size=16, device=device)
    train_loss = task.train(
        model,
        train_set,
        epochs=5,
        learning_rate=0.001,
        batch_size=8,
        class_weight=weights,
        device=device,
        seed=1,
    )
    after = task.evaluate(model, train_set, num_classes=len(LABELS), batch_size=16, device=device)

    assert np.isfinite(train_loss)
    assert after.loss < before.loss


def test_train_is_repeatable(site_dir: Path) -> None:
    train_set = task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)
    weights = task.class_weights(task.count_labels(train_set, len(LABELS)))
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = task.Net(len(LABELS))
        losses.append(
            task.train(
                model,
                train_set,
                epochs=1,
                learning_rate=0.001,
                batch_size=8,
                class_weight=weights,
                device=torch.device("cpu"),
                seed=7,
            )
        )

    assert losses[0] == pytest.approx(losses[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_and_evaluate_on_cuda(site_dir: Path) -> None:
    train_set = task.load_split(site_dir, LABELS, task.TRAIN_SPLIT, SITE)
    device = task.pick_device()
    torch.manual_seed(0)
    model = task.Net(len(LABELS))

    train_loss = task.train(
        model,
        train_set,
        epochs=1,
        learning_rate=0.001,
        batch_size=8,
        class_weight=task.class_weights(task.count_labels(train_set, len(LABELS))),
        device=device,
        seed=1,
    )
    result = task.evaluate(model, train_set, num_classes=len(LABELS), batch_size=16, device=device)

    assert device.type == "cuda"
    assert np.isfinite(train_loss)
    assert result.class_total.tolist() == [5] * 7
