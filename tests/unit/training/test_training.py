"""`monitor train` and `monitor evaluate` end to end on real ECG5000 subsets, and the default model's quality bar."""

from __future__ import annotations

import importlib.util
import json
import lzma
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from monitor.training.trainer import TrainSettings, train
from tests.support import DEFAULT_MODEL, REPO, SPLITS, run_cli

pytestmark = pytest.mark.slow

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TRAIN_ROWS, TEST_ROWS = 200, 300
# The flags every small training shares; seed and threads make it repeatable.
SMALL = ["--embedding-dim", "8", "--epochs", "3", "--seed", "0", "--threads", "1"]
# One OpenMP thread in every child: on a busy 2-core machine spinning worker threads cost 4x the CPU.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def head(source: Path, target: Path, rows: int) -> Path:
    with lzma.open(source, "rt") as handle:
        target.write_text("".join(next(handle) for _ in range(rows)))
    return target


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("monitor: error: ")
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All the trainings at once, each on one thread: `monitor train` from a YAML config whose keys
    flags override (then `monitor evaluate --json` on its artifact), the same training from flags
    alone with the report, a config with a misspelt key, and in this process seeds 0 and 1."""
    root = tmp_path_factory.mktemp("training")
    train_data = head(SPLITS / "train_normal.txt.xz", root / "train.txt", TRAIN_ROWS)
    test_data = head(SPLITS / "test.txt.xz", root / "test.txt", TEST_ROWS)
    config = root / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "train_data": str(train_data),
                "evaluate_data": str(test_data),
                "output": str(root / "from-yaml"),
                "name": "yaml-name",
                "version": "0.1.0",
                "embedding_dim": 32,
                "epochs": 100,
                "seed": 7,
                "threads": 2,
                "threshold": {"method": "quantile", "params": {"q": 0.95}},
            }
        )
    )
    typo = root / "typo.yaml"
    typo.write_text(yaml.safe_dump({"train_data": str(train_data), "epochz": 3}))

    def first_then_evaluate() -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess | None]:
        trained = run_cli(
            "train", "--config", str(config), *SMALL, "--output", str(root / "first"), "--no-report", env=ONE_THREAD
        )
        if trained.returncode:
            return trained, None
        return trained, run_cli(
            "evaluate", "--model", str(root / "first"), "--data", str(test_data), "--json", env=ONE_THREAD
        )

    def in_process() -> None:
        # In this process (its torch is already imported): the same training with seed 0 and seed 1.
        previous = torch.get_num_threads()
        try:
            for seed in (0, 1):
                train(
                    TrainSettings(
                        train_data=train_data,
                        output=root / f"seed{seed}",
                        embedding_dim=8,
                        epochs=3,
                        seed=seed,
                        threads=1,
                        report=False,
                    )
                )
        finally:
            torch.set_num_threads(previous)

    # Everything at once: the machine has 2 cores and each training uses one thread.
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(first_then_evaluate)
        second = pool.submit(
            run_cli,
            "train",
            "--train-data",
            str(train_data),
            "--evaluate-data",
            str(test_data),
            *SMALL,
            "--output",
            str(root / "second"),
            *([] if HAVE_MATPLOTLIB else ["--no-report"]),
            env=ONE_THREAD,
        )
        typo_run = pool.submit(run_cli, "train", "--config", str(typo), "--output", str(root / "typo"), env=ONE_THREAD)
        seeds = pool.submit(in_process)
        (first_run, evaluate_run), second_run, typo_run, _ = (
            first.result(),
            second.result(),
            typo_run.result(),
            seeds.result(),
        )
    return {
        "root": root,
        "train": train_data,
        "test": test_data,
        "typo_file": typo,
        "first": first_run,
        "second": second_run,
        "typo": typo_run,
        "evaluate": evaluate_run,
    }


def metadata(directory: Path) -> dict:
    return json.loads((directory / "model.json").read_text())


def test_train_writes_an_artifact_without_report(runs):
    process, out = runs["first"], runs["root"] / "first"
    assert process.returncode == 0, process.stderr
    assert f"model written to {out}" in process.stdout
    assert "Traceback" not in process.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "model.json",
        "model.safetensors",
        "pca.npz",
    ]  # --no-report: no report/
    meta = metadata(out)
    assert meta["architecture"] == {"type": "lstm_autoencoder", "window": 140, "channels": 1, "embedding_dim": 8}
    training = meta["training"]
    # No calibration file: validation and calibration windows are split off the 200 training beats.
    assert "calibration_file" not in training
    assert training["windows"] == TRAIN_ROWS - 30 - 30
    assert meta["threshold"]["n_windows"] == 30
    # the calibration windows' score distribution, for the drift statistic
    recorded = meta["calibration_scores"]
    assert recorded["n_windows"] == 30 and len(recorded["quantiles"]) == len(recorded["levels"]) == 10
    assert recorded["quantiles"] == sorted(recorded["quantiles"]) and 0 <= recorded["above_threshold"] < 0.5
    assert 1 <= training["epochs_run"] <= 3
    # The training-time evaluation on the 300-line subset is recorded and printed.
    evaluation = meta["evaluation"]
    assert evaluation["n_windows"] == TEST_ROWS
    assert evaluation["tp"] + evaluation["fp"] + evaluation["fn"] + evaluation["tn"] == TEST_ROWS
    assert "ROC AUC" in process.stdout and "confusion matrix" in process.stdout


def test_flags_override_yaml_keys(runs):
    meta = metadata(runs["root"] / "first")
    hyper = meta["training"]["hyperparameters"]
    # Overridden by flags ...
    assert (hyper["embedding_dim"], hyper["epochs"], hyper["seed"], hyper["threads"]) == (8, 3, 0, 1)
    assert meta["architecture"]["embedding_dim"] == 8
    assert meta["training"]["epochs_run"] <= 3
    assert not (runs["root"] / "from-yaml").exists()  # --output beat the YAML output
    # ... while the keys no flag touched keep their YAML values.
    assert (meta["name"], meta["version"]) == ("yaml-name", "0.1.0")
    assert meta["threshold"]["method"] == "quantile" and meta["threshold"]["params"] == {"q": 0.95}
    assert meta["evaluation"]["data"] == str(runs["test"])


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed: the report is skipped")
def test_train_with_report_writes_pngs(runs):
    process, out = runs["second"], runs["root"] / "second"
    assert process.returncode == 0, process.stderr
    pngs = sorted((out / "report").glob("*.png"))
    assert [p.name for p in pngs] == ["errors.png", "loss.png", "reconstructions.png"]
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, png
    assert "report: " in process.stdout


def test_same_seed_gives_identical_weights(runs):
    # Two separate processes, same data and seed, one thread each (and different YAML/flag routes).
    first, second = runs["root"] / "first" / "model.safetensors", runs["root"] / "second" / "model.safetensors"
    assert runs["second"].returncode == 0, runs["second"].stderr
    assert first.read_bytes() == second.read_bytes()
    assert metadata(first.parent)["weights"]["sha256"] == metadata(second.parent)["weights"]["sha256"]


def test_different_seed_gives_different_weights(runs):
    first = runs["root"] / "first" / "model.safetensors"
    # In-process training with seed 0 reproduces the CLI's bytes, so only the seed differs below.
    assert (runs["root"] / "seed0" / "model.safetensors").read_bytes() == first.read_bytes()
    reference = load_file(str(first))
    other = load_file(str(runs["root"] / "seed1" / "model.safetensors"))
    assert reference.keys() == other.keys()
    assert all(reference[key].shape == other[key].shape for key in reference)
    differing = [key for key in reference if not torch.equal(reference[key], other[key])]
    assert len(differing) == len(reference)  # every tensor differs, not just one


def test_yaml_typo_is_one_clear_line(runs):
    process = runs["typo"]
    assert process.returncode == 2
    line = one_error_line(process.stderr)
    assert line == f"monitor: error: {runs['typo_file']}: epochz: unknown key (misspelt?)"
    assert not (runs["root"] / "typo").exists()


def test_evaluate_json(runs):
    out, process = runs["root"] / "first", runs["evaluate"]
    assert runs["first"].returncode == 0, runs["first"].stderr
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout)
    for key in ("auc", "f1", "precision", "recall", "fpr", "tp", "fp", "fn", "tn"):
        assert key in result, key
    assert result["tp"] + result["fp"] + result["fn"] + result["tn"] == TEST_ROWS
    assert result["model"] == {"name": "yaml-name", "version": "0.1.0"}
    assert 0.0 <= result["auc"] <= 1.0
    # Offline evaluation scores exactly as training's evaluation did (same scorer, same threshold).
    recorded = metadata(out)["evaluation"]
    for key in ("tp", "fp", "fn", "tn"):
        assert result[key] == recorded[key], key
    assert result["auc"] == pytest.approx(recorded["auc"], abs=1e-9)
    labels = [line.split()[0] for line in runs["test"].read_text().splitlines()]
    assert result["tp"] + result["fn"] == sum(label != "1.0000000e+00" for label in labels)


def test_default_model_meets_the_quality_bar():
    if not (DEFAULT_MODEL / "model.json").is_file():
        pytest.skip(f"{DEFAULT_MODEL.relative_to(REPO)} is not there yet (train it with `make train`)")
    process = run_cli(
        "evaluate",
        "--model",
        "models/ecg5000",
        "--data",
        "data/ecg5000/splits/test.txt.xz",
        "--json",
        timeout=180,
        env=ONE_THREAD,
    )
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout)
    assert result["tp"] + result["fp"] + result["fn"] + result["tn"] == 3103
    assert result["auc"] >= 0.99, result
    assert result["recall"] >= 0.95, result
    assert result["fpr"] <= 0.02, result


# --- refusals and the small-calibration warning ---------------------------------------------------


def test_small_calibration_set_warns_with_the_threshold_uncertainty(runs):
    process, out = runs["first"], runs["root"] / "first"
    assert process.returncode == 0, process.stderr
    # 30 calibration windows (below 200): the warning gives the false-alarm interval the threshold implies.
    assert "calibration_set_small" in process.stderr
    assert "rests on 30 calibration windows" in process.stderr and "of normal windows" in process.stderr
    uncertainty = metadata(out)["threshold"]["uncertainty"]
    low, high = uncertainty["false_alarm_rate"]
    assert uncertainty["confidence"] == 0.95
    assert 0.0 <= low < 1 - 0.95 < high <= 1.0  # the intended 5 % lies inside, and 30 windows leave it wide
    assert high - low > 0.1


def test_one_dimensional_npy_without_window_is_refused(tmp_path):
    recording = tmp_path / "lead.npy"
    np.save(recording, np.zeros(5000, dtype=np.float32))
    process = run_cli("train", "--train-data", str(recording), "--output", str(tmp_path / "model"), env=ONE_THREAD)
    assert process.returncode == 2
    assert one_error_line(process.stderr) == (
        f"monitor: error: {recording}: holds one recording of 5000 samples, not windows: give --window (and --stride)"
    )
    assert not (tmp_path / "model").exists()


def test_existing_artifact_is_kept_without_force(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.json").write_text("{}")
    train_data = head(SPLITS / "train_normal.txt.xz", tmp_path / "train.txt", 100)
    process = run_cli("train", "--train-data", str(train_data), "--output", str(out), *SMALL, env=ONE_THREAD)
    assert process.returncode == 2
    assert one_error_line(process.stderr) == (
        f"monitor: error: {out}: holds a model already (model.json); use --force to replace it"
    )
    assert sorted(p.name for p in out.iterdir()) == ["model.json"] and (out / "model.json").read_text() == "{}"


def test_force_replaces_the_model_and_clears_the_stale_report(runs, tmp_path):
    """--force with --no-report leaves no old plot; without evaluation data the report still has reconstructions."""
    jobs = {}
    for name, extra in (("quiet", ["--no-report"]), ("plotted", [])):
        out = tmp_path / name
        shutil.copytree(runs["root"] / "first", out)
        (out / "report").mkdir()
        (out / "report" / "loss.png").write_bytes(b"an old plot")
        jobs[name] = [
            "train",
            "--train-data",
            str(runs["train"]),
            "--output",
            str(out),
            *SMALL,
            "--seed",
            "5",
            "--force",
            *extra,
        ]
    if not HAVE_MATPLOTLIB:
        jobs.pop("plotted")
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(jobs, pool.map(lambda args: run_cli(*args, env=ONE_THREAD), jobs.values()), strict=True))
    for name, process in done.items():
        assert process.returncode == 0, process.stderr
        assert metadata(tmp_path / name)["training"]["hyperparameters"]["seed"] == 5
    assert sorted(p.name for p in (tmp_path / "quiet").iterdir()) == ["model.json", "model.safetensors", "pca.npz"]
    if "plotted" in done:
        report = tmp_path / "plotted" / "report"
        assert sorted(p.name for p in report.iterdir()) == ["errors.png", "loss.png", "reconstructions.png"]
        assert (report / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_train_help_shows_every_default():
    from monitor.cli import build_parser
    from monitor.model.calibration import DEFAULT_PARAMS
    from monitor.training.settings import TrainSettings

    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in train_parser._actions:
        if action.option_strings and action.dest != "help":
            assert "(default" in action.help or "(required" in action.help, action.option_strings
    text = " ".join(train_parser.format_help().split())
    assert (
        "(default: 32)" in text
        and "(default: 150; with --segmentation beats: 30)" in text
        and "(default: 0.002)" in text
    )
    assert "grad_clip 1.0" in text  # keys without a flag are listed with their defaults
    # The defaults are the bundled recipe's (configs/train-ecg5000.yaml), its one thread included.
    recipe = yaml.safe_load((REPO / "configs" / "train-ecg5000.yaml").read_text())
    defaults = TrainSettings(train_data="x")
    paths_and_names = {"train_data", "calibration_data", "evaluate_data", "output", "name", "version"}
    for key in recipe.keys() - paths_and_names - {"threshold"}:
        assert getattr(defaults, key) == recipe[key], key
    assert defaults.threads == 1 and "0 = one per core (default: 1)" in text
    assert defaults.threshold.method == recipe["threshold"]["method"]
    assert DEFAULT_PARAMS[defaults.threshold.method] == recipe["threshold"]["params"]
