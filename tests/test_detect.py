"""advfast detect: splits by input index, deterministic training, Tables II/III, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from advfast import cli
from advfast.experiments import detect


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Adversarial examples of two losses on the same 90 digits."""
    root = tmp_path_factory.mktemp("adv")
    out = {}
    for loss in ("ce", "ce-sign"):
        out[loss] = str(root / loss)
        assert cli.main(["generate", "--loss", loss, "--split", "all", "--n", "90",
                         "--iterations", "120", "--quiet", "--out", out[loss]]) == 0
    return out


def test_splits_are_disjoint_by_input_index(folders):
    adversarial, genuine = detect.load_sources(folders)
    pool = detect.examples(adversarial, genuine, list(folders))
    sets = detect.split_sets(pool, seed=0, fractions=(0.6, 0.2))
    seen = {name: set(s.index.tolist()) for name, s in sets.items()}
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"])
    assert not (seen["val"] & seen["test"])
    assert sum(len(s.labels) for s in sets.values()) == len(pool.labels)
    for name, s in sets.items():  # every image of an input on its side: genuine + both attacks
        for i in seen[name]:
            assert (s.index == i).sum() == 3
    # the genuine image is the clean input, the adversarial one differs from it
    first = sets["train"]
    assert first.labels[:3].tolist() == [0, 1, 1] and first.attack[:3] == ["genuine", "ce",
                                                                             "ce-sign"]
    assert not torch.equal(first.images[0], first.images[1])
    # balanced: the genuine image weighs as much as the two adversarial ones
    assert first.weight[:3].tolist() == [2.0, 1.0, 1.0]


def test_detector_training_is_deterministic(folders, tmp_path):
    adversarial, genuine = detect.load_sources(folders)
    sets = detect.split_sets(detect.examples(adversarial, genuine, ["ce"]), 0, (0.6, 0.2))
    config = detect.DetectConfig(out=str(tmp_path), epochs=3, batch_size=32)
    results = []
    for k in range(2):
        model, val, history, _ = detect.train_detector("cnn-s", 1e-3, sets, config,
                                                       str(tmp_path / f"run{k}.pt"), lambda: None)
        results.append((val, history, [p.detach().clone() for p in model.parameters()]))
    assert results[0][:2] == results[1][:2]
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))


FAST = ["--epochs", "4", "--lr", "1e-3", "--detectors", "cnn-s", "cnn-m", "--quiet"]


def test_detect_writes_tables_two_and_three(folders, tmp_path, capsys):
    out = tmp_path / "det"
    sources = [f"{k}={v}" for k, v in folders.items()]
    assert cli.main(["detect", "--from", *sources, "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "TABLE II" in printed and "TABLE III" in printed and "Overall Accuracy" in printed
    t2 = json.loads((out / "table2.json").read_text())["rows"]
    assert {(tuple(r["attacks"]), r["detector"]) for r in t2} == {
        ((a,), d) for a in folders for d in ("cnn-s", "cnn-m")}
    t3 = json.loads((out / "table3.json").read_text())["rows"]
    assert [r["detector"] for r in t3] == ["cnn-s", "cnn-m"]
    for r in t2 + t3:
        assert 0 <= r["genuine"] <= 1 and 0 <= r["adversarial"] <= 1 and r["lr"] == 1e-3
    assert set(t3[0]) >= {"ce", "ce-sign", "adversarial", "genuine", "balanced"}
    assert (out / "table2.csv").exists() and (out / "detect.png").read_bytes()[:4] == b"\x89PNG"
    for r in t2 + t3:  # every accuracy with its 95 % interval over the test split
        for key in ("genuine", "adversarial", "balanced", *r["attacks"]):
            lo, hi = r[f"{key}_ci95"]
            assert lo <= r[key] <= hi
        n = r["test_sizes"]["genuine"]
        assert r["genuine_ci95"] == pytest.approx(detect.wilson(r["genuine"], n))
        assert r["per_seed"][0]["genuine"] == r["genuine"] and r["seeds"] == [0]
    assert "\u00b1" in printed and "LATTICE CONTROL" in printed
    lattice = json.loads((out / "table2.json").read_text())["lattice"]
    assert lattice["levels"] == 16  # the digits' values are k/16
    assert {(tuple(r["attacks"]), r["detector"]) for r in lattice["rows"]} == {
        ((a,), d) for a in folders for d in ("cnn-s", "cnn-m")}
    assert "lattice" in json.loads((out / "table3.json").read_text())


def test_wilson_interval_matches_scipy_and_a_closed_form():
    stats = pytest.importorskip("scipy.stats")
    assert detect.wilson(0.5, 100) == pytest.approx([0.403832, 0.596168], abs=1e-6)
    for k, n in [(0, 10), (3, 10), (10, 10), (57, 80), (1, 1000)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert detect.wilson(k / n, n) == pytest.approx([ci.low, ci.high], abs=1e-9)
    balanced = detect.intervals({"genuine": 0.9, "adversarial": 0.7, "balanced": 0.8},
                                {"genuine": 20, "adversarial": 40})["balanced"]
    assert balanced == pytest.approx([(a + b) / 2 for a, b in zip(detect.wilson(0.9, 20),
                                                                   detect.wilson(0.7, 40))])


def test_lattice_rounding_puts_adversarial_examples_on_the_genuine_lattice(folders):
    adversarial, genuine = detect.load_sources(folders)
    levels = detect.lattice_levels(detect.origin_of(folders["ce"]))
    assert levels == 16
    lattice = torch.arange(levels + 1, dtype=torch.float32) / levels
    values = torch.cat([x.flatten() for x in genuine.values()])
    assert torch.isin(values, lattice).all()  # the genuine digits are k/16
    off = torch.cat([x.flatten() for x in adversarial["ce"].values()])
    assert not torch.isin(off, lattice).all()  # the attack left the lattice
    rounded = detect.lattice_examples(adversarial, levels)
    for name, per in rounded.items():
        assert per.keys() == adversarial[name].keys()
        for i, x in per.items():
            assert torch.isin(x, lattice).all()  # exactly on it
            assert (x - adversarial[name][i]).abs().max() <= 0.5 / levels + 1e-7
    assert detect.lattice_levels({"model": "mnist", "data": None}) == 255
    assert detect.lattice_levels({"model": "resnet18", "data": "/images"}) == 255


def test_seeds_repeat_training_and_report_the_mean(folders, tmp_path):
    config = detect.DetectConfig(out=str(tmp_path), sources={"ce": folders["ce"]},
                                 detectors=("cnn-s",), lrs=(1e-3,), epochs=2, seeds=2,
                                 lattice=False)
    results = detect.run(config)
    assert "lattice" not in results
    for row in results["table2"] + results["table3"]:
        assert row["seeds"] == [0, 1] and [r["seed"] for r in row["per_seed"]] == [0, 1]
        for key in ("genuine", "adversarial", "balanced"):
            assert row[key] == pytest.approx(sum(r[key] for r in row["per_seed"]) / 2)
            lo, hi = row["per_seed"][1][f"{key}_ci95"]
            assert lo <= row["per_seed"][1][key] <= hi
    assert (tmp_path / "runs" / "table2-ce-cnn-s-lr0.001-seed1.json").exists()
    assert (tmp_path / "runs" / "table2-ce-cnn-s-lr0.001.json").exists()  # the first: as before
    assert "mean over 2 training seeds" in detect.format_tables(results)


def test_killed_detect_resumes_from_its_checkpoint(folders, tmp_path):
    sources = [f"{k}={v}" for k, v in folders.items()]
    args = ["detect", "--from", *sources, "--epochs", "40", "--lr", "1e-3", "--detectors",
            "cnn-m", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "advfast", *args, "--out", str(killed)])
    checkpoints = killed / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline:
        done = list((killed / "runs").glob("*.json")) if (killed / "runs").exists() else []
        if checkpoints.exists() and any(checkpoints.iterdir()) and not done:
            state = None
            try:
                state = torch.load(next(checkpoints.iterdir()), weights_only=False)
            except Exception:  # caught mid-rename: look again
                pass
            if state and 5 <= state["epoch"] < 40:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = next(checkpoints.iterdir())
    started = torch.load(interrupted, weights_only=False)["epoch"]
    assert 0 < started < 40, "the run was not caught in the middle of training"
    resumed = subprocess.run([sys.executable, "-m", "advfast", *args, "--out", str(killed),
                              "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    run = json.loads((killed / "runs" / (interrupted.stem + ".json")).read_text())
    assert run["resumed_at_epoch"] == started  # it continued, it did not start over
    fresh = tmp_path / "fresh"
    assert cli.main([*args, "--out", str(fresh)]) == 0
    for table in ("table2.json", "table3.json"):
        assert json.loads((killed / table).read_text()) == json.loads((fresh / table).read_text())


def test_unknown_detector_is_refused_before_any_work(tmp_path, capsys):
    assert cli.main(["detect", "--detectors", "cnn-xl", "--out", str(tmp_path / "d")]) == 2
    assert "unknown detector 'cnn-xl'" in capsys.readouterr().err
    assert cli.main(["detect", "--detectors", "resnet18", "--out", str(tmp_path / "d")]) == 2
    assert "3-channel" in capsys.readouterr().err
    assert not (tmp_path / "d" / "adversarial").exists()


def test_detect_refuses_a_foreign_folder_and_keeps_its_files(folders, tmp_path, capsys):
    out = tmp_path / "det"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["detect", "--from", f"ce={folders['ce']}", "--out", str(out),
                     *FAST]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["detect", "--from", f"ce={folders['ce']}", "--out", str(out), "--resume",
                     *FAST]) == 2
    assert "not an advfast detect output" in capsys.readouterr().err
    assert os.path.exists(out / "notes.txt")


def test_detect_on_an_image_folder_with_a_torchvision_detector(tmp_path, capsys):
    """User data: a labelled folder, a torchvision model to attack and a torchvision detector."""
    from safetensors.torch import save_file

    from advfast import models
    from fixtures import labelled_folder

    model = models.load("resnet18", num_classes=5)
    folder, rows = labelled_folder(tmp_path, model, count=40, size=16, seed=1)
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(weights))
    out = tmp_path / "det"
    code = cli.main(["detect", "--model", "resnet18", "--weights", str(weights), "--num-classes",
                     "5", "--data", str(folder), "--image-size", "16", "--losses", "ce,ce-sign",
                     "--iterations", "20", "--beta", "20", "--detectors", "resnet18",
                     "--epochs", "2", "--lr", "1e-3", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    t3 = json.loads((out / "table3.json").read_text())["rows"]
    assert [r["detector"] for r in t3] == ["resnet18"] and 0 <= t3[0]["balanced"] <= 1
