"""The command line end to end on tiny settings, and the table1 experiment behind it."""

import contextlib
import csv
import json
import os

import pytest
import torch

from advfast import cli, models
from advfast.engine import timing
from advfast.experiments import table1
from advfast.io import models as io_models, selection
from fixtures import labelled_folder, small_model


def test_table1_writes_every_cell_its_tables_and_figures(tmp_path, capsys):
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


def test_attack_command_on_a_labelled_folder_and_on_digits_writes_its_outputs(tmp_path):
    model = models.load("resnet18", num_classes=10)
    weights = tmp_path / "w.pt"
    torch.save(model.model.state_dict(), weights)
    # every image labelled with the model's own answer: all "correct"
    folder, rows = labelled_folder(tmp_path, model, count=6, size=32, seed=0)
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
def test_bad_arguments_are_one_line_errors_with_status_2(argv, message, capsys, tmp_path):
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


def _recording(real, calls, name):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("command", ["table1", "attack"])
def test_a_non_empty_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch, command):
    """Refused before the model is loaded or an input selected; the same command on an empty
    folder does both (so the recording below can see them)."""
    calls = []
    for owner, name in ((io_models, "load"), (selection, "prepare")):
        monkeypatch.setattr(owner, name, _recording(getattr(owner, name), calls, name))
    argv = [command, "--n", "3", "--iterations", "2", "--quiet"]
    if command == "table1":
        argv.append("--no-figures")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert cli.main(argv + ["--out", str(busy)]) == 2
    assert calls == [], f"work done before the refusal: {calls}"
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(busy)) == ["notes.txt"]
    assert cli.main(argv + ["--out", str(tmp_path / "empty")]) == 0
    assert calls == ["load", "prepare"]


class FakeClock:
    """Stands in for the time module in advfast.engine.timing: time moves only when told."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


# Powers of two, so the clock's sums are exact.
STARTUP_S, FORWARD_S = 2.0 ** 10, 2.0 ** -10


class SlowStart(torch.nn.Module):
    """The small CNN, whose first forward at each batch size costs STARTUP_S on the clock (as
    lazy initialisation or a compilation per shape would) and every forward FORWARD_S."""

    def __init__(self, clock):
        super().__init__()
        self.inner, self.clock, self.sizes = small_model(), clock, set()

    def forward(self, x):
        if len(x) not in self.sizes:
            self.sizes.add(len(x))
            self.clock.now += STARTUP_S
        self.clock.now += FORWARD_S
        return self.inner(x)


def test_table1_timing_excludes_start_up(monkeypatch):
    """No cell's time holds a start-up cost, of the first or of the last (smaller) batch: on a
    clock only the model moves, every batch of every cell takes the same time per iteration."""
    clock = FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    model = SlowStart(clock)
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model.inner(x).argmax(1)
    chosen = selection.AttackInputs(x, labels, torch.arange(10), [""] * 10, (labels + 1) % 10, 10)
    iterations = 5
    cells = table1.run(model, chosen, iterations=iterations, alpha=0.01, beta=0.5, batch_size=4,
                       device=torch.device("cpu"), quiet=True)
    assert {4, 2} <= model.sizes, "the start-up of both batch sizes was paid"
    times = [ms for cell in cells for ms in cell.per_iteration_ms]
    assert len(cells) == 8 and len(times) == 8 * 3
    assert max(times) < 1e3 * STARTUP_S / iterations, times
    assert times == [times[0]] * len(times), times


@pytest.mark.parametrize("command", ["attack", "generate"])
def test_compile_on_the_cpu_says_why_eager_is_the_default(tmp_path, capsys, command):
    base = [command, "--n", "2", "--iterations", "2", "--device", "cpu"]
    assert cli.main(base + ["--out", str(tmp_path / "eager")]) == 0
    assert "torch.compile on the CPU" not in capsys.readouterr().err
    assert cli.main(base + ["--compile", "aot_eager", "--out", str(tmp_path / "compiled")]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "torch.compile on the CPU" in line]
    assert len(notes) == 1 and "--compile none aot_eager" in notes[0]


@pytest.mark.parametrize("command", ["attack", "generate", "table1"])
def test_bf16_on_a_cpu_without_bf16_instructions_says_it_is_emulated(tmp_path, capsys,
                                                                     monkeypatch, command):
    from advfast.cli import options

    base = [command, "--n", "2", "--iterations", "2", "--device", "cpu", "--amp", "bf16"]
    if command == "table1":
        base += ["--no-figures", "--batch-size", "2"]
    runs = [("amx", [], 0), ("avx512_bf16", [], 0), ("none", ["--quiet"], 0), ("none", [], 1)]
    for k, (hardware, quiet, expected) in enumerate(runs):
        monkeypatch.setattr(options, "cpu_bf16", lambda: hardware)
        assert cli.main(base + quiet + ["--out", str(tmp_path / str(k))]) == 0
        err = capsys.readouterr().err
        notes = [line for line in err.splitlines() if "no bf16 instructions" in line]
        assert len(notes) == expected, (hardware, quiet, err)
    assert "--amp bf16 runs emulated" in notes[0] and "--peers none" in notes[0]


@pytest.mark.parametrize("command,extra,attacks", [
    ("attack", ["--attack", "cw-l2", "--binary-search-steps", "1"], 1), ("generate", [], 1),
    ("table1", ["--no-figures", "--batch-size", "2"], 8)])
def test_channels_last_reaches_the_attacks_a_command_runs(tmp_path, monkeypatch, command, extra,
                                                          attacks):
    # (generate's up-front check builds one more, on no model; table1's Theorem IV.2 its own)
    from advfast.attacks import base

    made = []
    init = base.BaseAttack.__init__

    def recording(self, model, **options):
        init(self, model, **options)
        made.append(self.channels_last)

    monkeypatch.setattr(base.BaseAttack, "__init__", recording)
    argv = [command, "--n", "2", "--iterations", "2", "--device", "cpu", "--quiet", *extra]
    for flag, expected in (([], 0), (["--channels-last"], attacks)):
        made.clear()
        assert cli.main(argv + flag + ["--out", str(tmp_path / f"{command}{expected}")]) == 0
        assert made and made.count(True) == expected
