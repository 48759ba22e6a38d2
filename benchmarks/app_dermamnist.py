"""Benchmark the federated skin lesion app on DermaMNIST against central training.

    .venv/bin/python benchmarks/app_dermamnist.py [--rounds 20] [--out DIR]

The official train split is divided over 3 sites with label skew (per class,
Dirichlet(alpha) shares, seeded). The official test split is divided evenly,
so the pooled federated evaluation covers exactly the official test split.
The federated run uses the real ServerApp and ClientApp code, with the sites
in this process (`--runtime inprocess`, no lab needed) or on a deployed lab
(`--runtime lab`, after `melody_lab up --supernodes 3 --dataset OUT/lab-data`
and a deploy; see docs/benchmarks.md). The central baseline trains the same
model with the same code on the union of the shards, for the same number of
passes over the data with the same learning-rate schedule.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "melody_app"
DERMAMNIST = REPO.parent / "shared" / "data" / "dermamnist28"
sys.path.insert(0, str(APP_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inprocess_grid import InProcessGrid, Site  # noqa: E402
from skin_lesion import client_app, server_app, sitedata, task  # noqa: E402

log = logging.getLogger("benchmark")
RESULT_PREFIX = "MELODY_RESULT "
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

# Published centralised MedMNIST v2 results on the DermaMNIST 28x28 test split.
TARGET_AUC = 0.92
TARGET_ACCURACY = 0.77
TARGET_RATIO = 0.95


def default_run_config() -> dict:
    with (APP_DIR / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def read_rows(dataset: Path) -> list[dict[str, str]]:
    with (dataset / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def partition(rows: list[dict[str, str]], labels: list[str], num_sites: int, alpha: float,
              seed: int) -> list[list[dict[str, str]]]:
    """Split train rows per class by Dirichlet(alpha) shares; test rows evenly at random."""
    rng = np.random.default_rng(seed)
    shards: list[list[dict[str, str]]] = [[] for _ in range(num_sites)]
    for label in labels:
        members = [row for row in rows if row["split"] == "train" and row["label"] == label]
        order = rng.permutation(len(members))
        shares = rng.dirichlet([alpha] * num_sites)
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for site, indices in enumerate(np.split(order, cuts)):
            shards[site].extend(members[index] for index in indices)

    test_rows = [row for row in rows if row["split"] == "test"]
    for position, index in enumerate(rng.permutation(len(test_rows))):
        shards[position % num_sites].append(test_rows[index])
    return shards


def write_site(folder: Path, rows: list[dict[str, str]]) -> Path:
    """Write a site's labels.csv; its images folder links to the shared, read-only images."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "images"
    if not link.exists():
        link.symlink_to(DERMAMNIST / "images", target_is_directory=True)
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "split"],
                                extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return folder


def run_inprocess(site_dirs: list[Path], run_config: dict, out: Path) -> dict:
    """Run the ServerApp with the sites' ClientApps in this process; return its result."""
    sites = [Site(node_id=index + 1, node_config={
        "partition-id": index, "data-dir": str(folder), "cache-dir": str(out / "cache")})
        for index, folder in enumerate(site_dirs)]
    grid = InProcessGrid(client_app.app, sites, run_id=1, run_config=run_config)
    context = server_app.Context(1, 0, {}, server_app.RecordDict(), run_config)
    server_app.app(grid, context)
    metrics_file = Path(run_config["output-dir"]) / "run-1" / "metrics.json"
    result = json.loads(metrics_file.read_text())
    result["reply_bytes"] = {f"partition-id={site.node_id - 1}": site.sent_bytes for site in sites}
    return result


def run_lab(run_config: dict, connection: str, flwr_home: Path) -> dict:
    """Submit the app to a deployed federation and parse its MELODY_RESULT line."""
    overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in run_config.items()
                         if key not in ("output-dir",))
    env = {"FLWR_HOME": str(flwr_home), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "run", str(APP_DIR), connection, "--stream",
         "--run-config", overrides],
        capture_output=True, text=True, env=env, cwd=REPO, check=False,
    )
    output = ANSI_ESCAPE.sub("", completed.stdout)
    lines = [line for line in output.splitlines() if RESULT_PREFIX in line]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"flwr run failed ({completed.returncode}):\n{output[-4000:]}"
                           f"\n{completed.stderr[-2000:]}")
    return json.loads(lines[-1].split(RESULT_PREFIX, 1)[1])


def run_central(site_dirs: list[Path], settings: task.RunSettings, out: Path) -> dict:
    """Train the same model with the same code on the union of the sites' train splits."""
    images, targets, tests = [], [], []
    for folder in site_dirs:
        data = sitedata.load_site(folder, settings.data, "central", cache_dir=out / "cache")
        images.append(data.splits["train"].images)
        targets.append(data.splits["train"].targets)
        tests.append(data.splits["test"])
    train_set = sitedata.ImageSet(torch.cat(images), torch.cat(targets))
    test_set = sitedata.ImageSet(torch.cat([item.images for item in tests]),
                                 torch.cat([item.targets for item in tests]))
    device = task.pick_device()
    torch.manual_seed(settings.seed)
    model = task.build_model(settings)
    counts = task.count_labels(train_set, len(settings.labels))
    weights = task.class_weights(counts, settings.class_weight_power)
    prior = task.log_prior(counts) if settings.prior_correction else None

    rounds = []
    for server_round in range(1, settings.num_rounds + 1):
        started = time.perf_counter()
        trained = task.train(
            model, train_set, epochs=settings.local_epochs,
            learning_rate=task.round_learning_rate(settings.learning_rate, server_round,
                                                   settings.num_rounds),
            batch_size=settings.batch_size, class_weight=weights, device=device,
            seed=settings.seed + server_round, train_log_prior=prior,
            optimizer_name=settings.local_optimizer)
        rounds.append(central_round(model, test_set, settings, prior, server_round, trained,
                                    started, device))
    # The same head rounds as the federation: the final layer alone, on frozen features.
    for server_round in range(settings.num_rounds + 1, task.total_rounds(settings) + 1):
        started = time.perf_counter()
        trained = task.train_head(
            model, train_set, epochs=settings.local_epochs,
            learning_rate=task.head_learning_rate(settings, server_round),
            batch_size=settings.batch_size,
            class_weight=weights, device=device, seed=settings.seed + server_round,
            train_log_prior=prior)
        rounds.append(central_round(model, test_set, settings, prior, server_round, trained,
                                    started, device))
    # Saved like the federation's model.pt, to compare the two models after the run.
    torch.save({"state_dict": model.state_dict(), "labels": list(settings.labels),
                "settings": settings.as_dict()}, out / "central-model.pt")
    return {"device": task.device_name(device), "train_examples": len(train_set),
            "test_examples": len(test_set), "rounds": rounds}


def central_round(model: torch.nn.Module, test_set: sitedata.ImageSet,
                  settings: task.RunSettings, prior: torch.Tensor | None, server_round: int,
                  trained: task.TrainResult, started: float, device: torch.device) -> dict:
    """Evaluate the central model after one round and log the round's figures."""
    result = task.evaluate(model, test_set, num_classes=len(settings.labels),
                           batch_size=256, device=device,
                           test_time_augmentation=settings.test_time_augmentation,
                           eval_log_prior=prior)
    entry = {"round": server_round, "head_round": task.is_head_round(settings, server_round),
             "train_loss": trained.loss, "accuracy": result.accuracy,
             "balanced_accuracy": result.balanced_accuracy, "macro_auc": result.macro_auc,
             "round_seconds": round(time.perf_counter() - started, 2),
             "images_per_second": round(trained.images_per_second, 1)}
    log.info("central round %d: %s", server_round, json.dumps(entry))
    return entry


def report(federated: dict, central: dict | None) -> dict:
    last = federated["rounds"][-1]
    summary = {
        "federated": {key: last[key] for key in ("accuracy", "balanced_accuracy", "macro_auc")},
        "targets_met": {
            "macro_auc": last["macro_auc"] >= TARGET_AUC,
            "accuracy": last["accuracy"] >= TARGET_ACCURACY,
        },
        "per_site": {},
        "model_parameter_bytes": federated["model_parameter_bytes"],
    }
    # Head rounds skip the backward pass through most of the model, so their
    # times and rates are reported apart from those of the training rounds.
    for kind, head in (("training", False), ("head", True)):
        chosen = [entry for entry in federated["rounds"] if entry.get("head_round", False) == head]
        if not chosen:
            continue
        summary[f"mean_{kind}_round_seconds"] = float(np.mean([entry["round_seconds"]
                                                             for entry in chosen]))
        sites: dict[str, list[dict]] = {}
        for entry in chosen:
            for site in entry["sites"]:
                sites.setdefault(site["site"], []).append(site)
        for name, items in sites.items():
            summary["per_site"].setdefault(name, {}).update({
                "device": items[-1]["device"], "train_examples": items[-1]["train_examples"],
                f"mean_{kind}_images_per_second": float(np.mean(
                    [item["images_per_second"] for item in items])),
                "sent_array_bytes_per_round": items[-1]["sent_array_bytes"]})
    if central:
        end = central["rounds"][-1]
        summary["central"] = {key: end[key] for key in
                              ("accuracy", "balanced_accuracy", "macro_auc")}
        summary["ratios"] = {key: last[key] / end[key] for key in ("balanced_accuracy",
                                                                   "macro_auc")}
        summary["targets_met"].update(
            {f"{key}_ratio": value >= TARGET_RATIO for key, value in summary["ratios"].items()})
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "benchmark-app")
    parser.add_argument("--runtime", choices=("inprocess", "lab"), default="inprocess")
    parser.add_argument("--connection", default="lab", help="flwr connection for --runtime lab")
    parser.add_argument("--flwr-home", type=Path, default=Path.home() / ".flwr")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--partition-seed", type=int, default=2024)
    parser.add_argument("--part", choices=("both", "federated", "central", "report"),
                        default="both", help="run one side only (two processes can share the "
                        "--out folder), or only report what earlier runs saved")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in this process (default 1: on a busy machine "
                        "more threads mostly wait for each other)")
    parser.add_argument("--run-config", default="",
                        help="overrides as 'key=value key=value' (values in TOML syntax)")
    args = parser.parse_args()
    args.out = args.out.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    run_config = default_run_config()
    if args.run_config:
        run_config.update(tomllib.loads("\n".join(args.run_config.split())))
    run_config["min-nodes"] = args.sites
    run_config["output-dir"] = str((args.out / "artefacts").resolve())
    settings = task.read_settings(run_config)

    rows = read_rows(DERMAMNIST)
    shards = partition(rows, list(settings.labels), args.sites, args.alpha, args.partition_seed)
    site_dirs = [write_site(args.out / "data" / f"site-{index}", shard)
                 for index, shard in enumerate(shards)]
    for index, shard in enumerate(shards):
        counts = {label: sum(1 for row in shard if row["label"] == label and row["split"] ==
                             "train") for label in settings.labels}
        log.info("site %d train images per class: %s", index, counts)
    # The same shards as one dataset, for `melody_lab up --dataset OUT/lab-data`.
    write_lab_dataset(args.out / "lab-data", shards)

    torch.set_num_threads(args.threads)
    if args.part in ("both", "federated"):
        started = time.perf_counter()
        if args.runtime == "inprocess":
            federated = run_inprocess(site_dirs, run_config, args.out)
        else:
            federated = run_lab(run_config, args.connection, args.flwr_home)
        federated["wall_seconds"] = round(time.perf_counter() - started, 1)
        federated["runtime"] = args.runtime
        (args.out / "federated.json").write_text(json.dumps(federated, indent=2) + "\n")
    if args.part in ("both", "central"):
        central = run_central(site_dirs, settings, args.out)
        (args.out / "central.json").write_text(json.dumps(central, indent=2) + "\n")
    if args.part in ("federated", "central"):
        return 0

    federated = json.loads((args.out / "federated.json").read_text())
    central_file = args.out / "central.json"
    central = json.loads(central_file.read_text()) if central_file.is_file() else None
    summary = report(federated, central)
    summary.update(runtime=federated["runtime"], federated_seconds=federated["wall_seconds"],
                   alpha=args.alpha, num_sites=args.sites, run_config=run_config,
                   torch_threads=args.threads)
    (args.out / "benchmark.json").write_text(json.dumps(
        {"summary": summary, "federated": federated, "central": central}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def write_lab_dataset(folder: Path, shards: list[list[dict[str, str]]]) -> None:
    """Write one dataset whose `site` column names the SuperNode that gets each row."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "images"
    if not link.exists():
        link.symlink_to(DERMAMNIST / "images", target_is_directory=True)
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image", "label", "split", "site"])
        for site, shard in enumerate(shards):
            writer.writerows([row["image"], row["label"], row["split"], site] for row in shard)


if __name__ == "__main__":
    sys.exit(main())
