"""Tests of the app's run settings, model, training and evaluation on real DermaMNIST images."""

import csv
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

APP_DIR = Path(__file__).resolve().parents[1] / "melody_app"
DERMAMNIST = Path("/work/shared/data/dermamnist28")

# The app directory is a Flower app, not an installed package.
sys.path.insert(0, str(APP_DIR))
from skin_lesion import sitedata, task  # noqa: E402

CPU = torch.device("cpu")


def default_config() -> dict:
    with (APP_DIR / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


@pytest.fixture(scope="module")
def dermamnist(tmp_path_factory: pytest.TempPathFactory) -> sitedata.SiteData:
    """The first 700 train and 300 test images of DermaMNIST.

    The temporary site links to the shared images, so only its manifest is new.
    """
    if not (DERMAMNIST / "labels.csv").is_file():
        pytest.skip(f"{DERMAMNIST} is not available")
    with (DERMAMNIST / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    chosen = ([row for row in rows if row["split"] == "train"][:700]
              + [row for row in rows if row["split"] == "test"][:300])
    site = tmp_path_factory.mktemp("dermamnist")
    (site / "images").symlink_to(DERMAMNIST / "images", target_is_directory=True)
    with (site / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "split"])
        writer.writeheader()
        writer.writerows(chosen)

    settings = sitedata.DataSettings(labels=tuple(task.parse_labels(default_config()["labels"])))
    return sitedata.load_site(site, settings, "test")


# Run settings


def test_defaults_read() -> None:
    settings = task.read_settings(default_config())

    assert settings.labels == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert settings.strategy == "fednova"
    assert settings.data.group_column == "lesion_id"
    assert settings.as_dict()["data"]["manifest_file"] == "labels.csv"


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("num-server-rounds", 0, "1 or more"),
    ("strategy", "fedsgd", "fedavg or fedprox or fednova"),
    ("proximal-mu", -0.1, "0 or more"),
    ("image-size", 4, "between 8 and 224"),
    ("class-weight-power", 2.0, "between 0 (no weighting) and 1 (balanced)"),
    ("test-fraction", 1.0, "greater than 0 and less than 1"),
    ("fraction-train", 0.0, "greater than 0 and at most 1"),
    ("norm", "layer", "batch or group"),
    ("server-momentum", 1.0, "less than 1"),
    ("server-learning-rate", 0.0, "greater than 0"),
    ("local-optimizer", "adam", "adamw or sgd"),
    ("batch-norm-statistics", "median", "average or pooled"),
    ("head-rounds", -1, "0 (none) or more"),
    ("head-learning-rate", 0.0, "greater than 0"),
])
def test_bad_setting_names_key_value_and_fix(key: str, value: object, expected: str) -> None:
    config = default_config()
    config[key] = value

    with pytest.raises(ValueError) as error:
        task.read_settings(config)

    message = str(error.value)
    assert f"{key}={value!r}" in message
    assert expected in message
    assert f"--run-config '{key}=...'" in message


def test_parse_labels() -> None:
    assert task.parse_labels(" mel, nv ") == ["mel", "nv"]
    with pytest.raises(ValueError, match="without empty entries"):
        task.parse_labels("mel,,nv")
    with pytest.raises(ValueError, match="repeated labels mel"):
        task.parse_labels("mel,nv,mel")


# Training helpers


def test_class_weights_by_hand() -> None:
    counts = np.array([6, 2, 0])

    balanced = task.class_weights(counts, power=1.0)
    plain = task.class_weights(counts, power=0.0)

    # Balanced: 8 images over 2 present classes give 8 / (2 * 6) and 8 / (2 * 2).
    assert balanced.tolist() == pytest.approx([2 / 3, 2.0, 0.0])
    assert plain.tolist() == pytest.approx([1.0, 1.0, 0.0])
    # Any power keeps the mean weight per image at 1.
    half = task.class_weights(counts, power=0.5).numpy()
    assert float(np.sum(half * counts)) == pytest.approx(8.0)


def test_learning_rate_decays_on_a_cosine() -> None:
    rates = [task.round_learning_rate(0.01, server_round, 4) for server_round in (1, 2, 3, 4)]

    assert rates[0] == pytest.approx(0.01)
    assert rates[2] == pytest.approx(0.01 * (0.05 + 0.95 * 0.5))
    assert rates == sorted(rates, reverse=True)


def test_augment_keeps_shape_and_range() -> None:
    images = torch.rand(16, 3, 28, 28)

    augmented = task.augment(images.clone(), torch.Generator().manual_seed(0))

    assert augmented.shape == images.shape
    assert float(augmented.min()) >= 0.0
    assert float(augmented.max()) <= 1.0
    assert not torch.equal(augmented, images)


def test_net_takes_the_configured_size_and_width() -> None:
    model = task.Net(7, width=8)

    assert model(torch.zeros(2, 3, 40, 40)).shape == (2, 7)
    assert task.parameter_bytes(model) == sum(
        value.numel() * value.element_size() for value in model.state_dict().values())


def test_group_norm_keeps_no_running_statistics() -> None:
    batch = task.Net(7, width=8, norm="batch")
    group = task.Net(7, width=8, norm="group")

    # Sites send the whole state dict: with group normalisation it contains weights only.
    assert any("running_var" in key for key in batch.state_dict())
    assert not any("running" in key or "num_batches" in key for key in group.state_dict())
    assert group(torch.zeros(2, 3, 28, 28)).shape == (2, 7)


# Training and evaluation


def test_training_lowers_the_loss(dermamnist: sitedata.SiteData) -> None:
    train_set = dermamnist.splits["train"]
    torch.manual_seed(0)
    model = task.Net(7, width=8)
    weights = task.class_weights(task.count_labels(train_set, 7), 0.3)

    first = task.train(model, train_set, epochs=1, learning_rate=0.003, batch_size=64,
                       class_weight=weights, device=CPU, seed=1)
    later = task.train(model, train_set, epochs=3, learning_rate=0.003, batch_size=64,
                       class_weight=weights, device=CPU, seed=2)

    assert later.loss < first.loss
    assert first.images_per_second > 0


def test_fedprox_keeps_weights_closer(dermamnist: sitedata.SiteData) -> None:
    train_set = dermamnist.splits["train"]
    weights = task.class_weights(task.count_labels(train_set, 7), 0.3)
    torch.manual_seed(0)
    start = task.Net(7, width=8)

    distances = {}
    for mu in (0.0, 1.0):
        model = task.Net(7, width=8)
        model.load_state_dict(start.state_dict())
        task.train(model, train_set, epochs=1, learning_rate=0.003, batch_size=64,
                   class_weight=weights, device=CPU, seed=1, proximal_mu=mu)
        distances[mu] = sum(float((after - before).detach().pow(2).sum()) for after, before in
                            zip(model.parameters(), start.parameters()))

    assert distances[1.0] < distances[0.0]


def test_head_rounds_follow_training_rounds() -> None:
    config = default_config()
    config.update({"num-server-rounds": 3, "head-rounds": 2})
    settings = task.read_settings(config)

    assert task.total_rounds(settings) == 5
    assert [task.is_head_round(settings, number) for number in range(1, 6)] == [
        False, False, False, True, True]


def test_train_head_changes_only_final_layer(dermamnist: sitedata.SiteData) -> None:
    train_set = dermamnist.splits["train"]
    counts = task.count_labels(train_set, 7)
    torch.manual_seed(0)
    model = task.Net(7, width=8)
    task.train(model, train_set, epochs=1, learning_rate=0.003, batch_size=64,
               class_weight=task.class_weights(counts, 0.0), device=CPU, seed=1)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    first = task.train_head(model, train_set, epochs=1, learning_rate=0.01, batch_size=64,
                            class_weight=task.class_weights(counts, 0.0), device=CPU, seed=2,
                            train_log_prior=task.log_prior(counts))
    later = task.train_head(model, train_set, epochs=3, learning_rate=0.01, batch_size=64,
                            class_weight=task.class_weights(counts, 0.0), device=CPU, seed=3,
                            train_log_prior=task.log_prior(counts))

    changed = sorted(name for name, tensor in model.state_dict().items()
                     if not torch.equal(tensor, before[name]))
    assert changed == ["classifier.2.bias", "classifier.2.weight"]
    assert later.loss < first.loss


def test_evaluate_counts_every_image(dermamnist: sitedata.SiteData) -> None:
    test_set = dermamnist.splits["test"]
    torch.manual_seed(0)

    result = task.evaluate(task.Net(7, width=8), test_set, num_classes=7, batch_size=64,
                           device=CPU)

    assert result.num_examples == 300
    assert result.confusion.sum() == 300
    assert result.confusion.sum(axis=1).tolist() == task.count_labels(test_set, 7).tolist()
    assert result.histograms.shape[:2] == (7, 2)
    assert result.histograms.sum() == 7 * 300
    assert 0.0 <= result.balanced_accuracy <= 1.0
    assert 0.0 <= result.macro_auc <= 1.0


def test_test_time_augmentation_ignores_orientation(dermamnist: sitedata.SiteData) -> None:
    test_set = dermamnist.splits["test"]
    turned = sitedata.ImageSet(torch.rot90(test_set.images, 1, dims=(-2, -1)).contiguous(),
                               test_set.targets)
    torch.manual_seed(0)
    model = task.Net(7, width=8)

    results = [task.evaluate(model, images, num_classes=7, batch_size=64, device=CPU,
                             test_time_augmentation=True) for images in (test_set, turned)]

    # A quarter turn only reorders the 8 views, so the averaged predictions agree.
    assert np.array_equal(results[0].confusion, results[1].confusion)
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-4)


def test_log_prior_by_hand() -> None:
    prior = task.log_prior(np.array([3, 1, 0]))

    assert prior.tolist() == pytest.approx([np.log(0.75), np.log(0.25), np.log(1e-6)])


def test_eval_prior_moves_predictions_to_the_common_class(dermamnist: sitedata.SiteData) -> None:
    test_set = dermamnist.splits["test"]
    torch.manual_seed(0)
    model = task.Net(7, width=8)
    # A prior that puts almost every image in class 5 (nv).
    prior = task.log_prior(np.array([1, 1, 1, 1, 1, 10**6, 1]))

    plain = task.evaluate(model, test_set, num_classes=7, batch_size=64, device=CPU)
    shifted = task.evaluate(model, test_set, num_classes=7, batch_size=64, device=CPU,
                            eval_log_prior=prior)

    assert shifted.confusion[:, 5].sum() == 300
    assert shifted.confusion[:, 5].sum() >= plain.confusion[:, 5].sum()
