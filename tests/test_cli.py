"""The command line, end to end on tiny settings."""

import csv
import json
import os

import contextlib

import pytest
import torch

from advfast import cli, data, models
from advfast.io import datasets


def test_table1_end_to_end(tmp_path, capsys):
    out = tmp_path / "t1"
    code = cli.main(["table1", "--n", "12", "--iterations", "6", "--batch-size", "5",
                     "--alpha", "0.02", "--beta", "1.0", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    for loss in ("ce", "ce-sign", "logit", "m-logit"):
        assert loss in printed
    results = json.loads((out / "table1.json").read_text())["results"]
    assert len(results) == 8 and all(r["n"] == 12 for r in results)
    assert all(r["flipped"] > 0 for r in results)
    rows = list(csv.DictReader(open(out / "table1.csv")))
    assert {(r["step"], r["loss"]) for r in rows} == {(r["step"], r["loss"]) for r in results}
    samples = list(csv.DictReader(open(out / "samples.csv")))
    assert len(samples) == 8 * 12
    for i in range(1, 6):
        png = out / f"fig{i}.png"
        assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_attack_command_on_a_folder(tmp_path):
    from PIL import Image

    model = models.load("resnet18", num_classes=10)
    weights = tmp_path / "w.pt"
    torch.save(model.model.state_dict(), weights)
    folder = tmp_path / "images"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(6):
        pixels = (torch.rand(32, 32, 3, generator=gen) * 255).byte()
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
        with Image.open(folder / f"{i}.png") as img:
            x = datasets.imagenet_eval_transform(32)(img.convert("RGB"))[None]
        with torch.no_grad():  # label every image with the model's own answer: all "correct"
            rows.append(f"{i}.png,{int(model(x).argmax())}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    base = ["attack", "--model", "resnet18", "--weights", str(weights), "--data", str(folder),
            "--image-size", "32", "--loss", "m-logit", "--step", "equal-perturbation", "--beta",
            "50", "--iterations", "3", "--stop", "never", "--batch-size", "4", "--quiet"]
    # the file holds a 10-class head: refused clearly without --num-classes
    assert cli.main(base + ["--out", str(tmp_path / "refused")]) == 2
    assert cli.main(base + ["--num-classes", "10", "--out", str(out), "--png"]) == 0
    metrics = list(csv.DictReader(open(out / "metrics.csv")))
    assert [m["path"] for m in metrics] == [str(folder / f"{i}.png") for i in range(6)]
    assert len(os.listdir(out / "png")) == 6

    out = tmp_path / "digits"
    code = cli.main(["attack", "--model", "digits", "--n", "7", "--iterations", "30",
                     "--loss", "ce", "--stop", "flip", "--out", str(out), "--png", "--quiet"])
    assert code == 0
    from safetensors.torch import load_file

    saved = load_file(str(out / "adversarial.safetensors"))
    assert saved["adversarial"].shape == (7, 1, 8, 8)
    metrics = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(metrics) == 7
    assert [int(m["index"]) for m in metrics] == saved["index"].tolist()
    assert all(int(m["target"]) != int(m["label"]) for m in metrics)
    assert len(os.listdir(out / "png")) == 7
    assert (out / "saliency.png").read_bytes()[:4] == b"\x89PNG"  # Fig. 5's panel
    assert json.loads((out / "summary.json").read_text())["n"] == 7


@pytest.mark.parametrize("argv,message", [
    (["table1", "--model", "resnet18"], "needs --data DIR"),
    (["table1", "--model", "vgg99", "--data", "."], "unknown model"),
    (["table1", "--n", "0"], "argument --n/--num-inputs: must be at least 1"),
    (["attack", "--data", "/nonexistent", "--model", "resnet18"], "does not exist"),
])
def test_errors_are_clear(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) if "--n" in argv else _no_exit() as exited:
        code = cli.main(argv + ["--out", str(tmp_path / "x")])
    if exited is not None:
        code = exited.value.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@contextlib.contextmanager
def _no_exit():
    yield None
