"""Nothing lost, nothing misleading: each case of the hostile-user report, as a test.

Numbers in the test names refer to the cases of the issue "Nothing lost, nothing misleading".
"""

import json
import math
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

import advfast
from advfast import cli, data, models
from advfast.attacks import BaseAttack, Eq11
from advfast.experiments import table1
from advfast.io import datasets, files, selection
from advfast.tools import generate
from test_attack import small_model

FAST = ["--n", "30", "--iterations", "30", "--beta", "0.5", "--batch-size", "8",
        "--shard-size", "7", "--compact-every", "2", "--quiet"]


def run(argv, capsys):
    """(exit status, stderr) of the CLI; the status of argparse's own exits too."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def one_line_error(code, err, *fragments):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def manifest(out):
    return [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]


def strict_json(text):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# --- durability of generate --------------------------------------------------------------

def test_02_a_second_run_on_a_busy_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["generate", "--out", out, "--n", "200", "--iterations", "5000", "--stop", "never",
            "--beta", "0.01", "--batch-size", "8", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "advfast", *map(str, argv)])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "selection.json").exists():
            time.sleep(0.1)
        assert (out / "selection.json").exists(), "the first run never started"
        second = subprocess.run([sys.executable, "-m", "advfast", *map(str, argv), "--resume"],
                                capture_output=True, text=True, timeout=60)
        one_line_error(second.returncode, second.stderr, "another advfast run",
                       f"pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = files.FolderLock(str(out))
    lock.acquire(first=True)  # the lock died with its holder
    lock.release()


def test_03_damaged_or_missing_shards_are_found_and_made_again(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["generate", "--out", out, *FAST], capsys)[0] == 0
    names = sorted(os.listdir(out / "shards"))
    os.remove(out / "shards" / names[0])
    with open(out / "shards" / names[1], "r+b") as f:
        f.truncate(100)
    with open(out / "shards" / names[2], "r+b") as f:  # same size, other bytes
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\1")
    with pytest.raises(ValueError, match="damaged or missing"):
        data.AdversarialDataset(str(out))  # size check on open
    code, err = run(["generate", "--out", out, *FAST, "--resume"], capsys)
    assert code == 0, err
    assert "3 damaged or missing shard(s)" in err and "checksum differs" in err
    rows = manifest(out)
    assert len(rows) == 30 and len({r["index"] for r in rows}) == 30
    dataset = data.AdversarialDataset(str(out), verify=True)
    assert len(dataset) == 30


def test_03_full_check_finds_flipped_bytes(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["generate", "--out", out, *FAST], capsys)[0] == 0
    name = sorted(os.listdir(out / "shards"))[0]
    with open(out / "shards" / name, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\1\2\3\4")
    data.AdversarialDataset(str(out))  # the cheap check passes: same size
    with pytest.raises(ValueError, match="checksum differs"):
        data.AdversarialDataset(str(out), verify=True)


def test_04_resume_refuses_a_foreign_folder_and_deletes_nothing(tmp_path, capsys):
    foreign = tmp_path / "mine"
    (foreign / "shards").mkdir(parents=True)
    files = [foreign / ".draft.tmp", foreign / "shards" / "shard-r000-000000.safetensors",
             foreign / "notes.txt"]
    for f in files:
        f.write_text("user data")
    code, err = run(["generate", "--out", foreign, *FAST, "--resume"], capsys)
    one_line_error(code, err, "not an advfast generate output")
    assert all(f.read_text() == "user data" for f in files)
    # in an advfast folder, a user's stray files are not advfast's temporary names either
    out = tmp_path / "run"
    assert run(["generate", "--out", out, *FAST], capsys)[0] == 0
    (out / ".notes.tmp").write_text("keep me")
    (out / "shards" / "README").write_text("keep me too")
    assert run(["generate", "--out", out, *FAST, "--resume"], capsys)[0] == 0
    assert (out / ".notes.tmp").exists() and (out / "shards" / "README").exists()


def test_05_config_is_written_first_and_identity_is_checked(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies during selection

    monkeypatch.setattr(selection, "select", killed)
    assert run(["generate", "--out", out, *FAST], capsys)[0] == 130
    monkeypatch.undo()
    assert (out / "config.json").exists() and not (out / "selection.json").exists()
    code, err = run(["generate", "--out", out, *FAST, "--resume", "--loss", "m-logit"], capsys)
    one_line_error(code, err, "--loss")
    assert run(["generate", "--out", out, *FAST, "--resume"], capsys)[0] == 0
    assert len(manifest(out)) == 30
    # a folder with a selection but no config is not resumed with any arguments
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "selection.json").write_text('{"work": [], "skipped": []}')
    code, err = run(["generate", "--out", orphan, *FAST, "--resume"], capsys)
    one_line_error(code, err, "no config.json")


def test_05_a_parameter_added_since_a_run_takes_its_default_on_resume(tmp_path, capsys,
                                                                      monkeypatch):
    # a cw-l2 run written before --warm-start existed has no warm_start in its identity
    out = tmp_path / "run"
    cw = ["--attack", "cw-l2", "--c", "1", "--iterations", "4", "--binary-search-steps", "1",
          "--n", "6", "--batch-size", "4", "--shard-size", "3", "--quiet"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(selection, "select", killed)
    assert run(["generate", "--out", out, *cw], capsys)[0] == 130
    monkeypatch.undo()
    config = json.loads((out / "config.json").read_text())
    del config["identity"]["warm_start"]
    (out / "config.json").write_text(json.dumps(config))
    code, err = run(["generate", "--out", out, *cw, "--resume", "--warm-start"], capsys)
    one_line_error(code, err, "--warm-start")
    assert run(["generate", "--out", out, *cw, "--resume"], capsys)[0] == 0
    assert len(manifest(out)) == 6


def test_05_weights_identity_is_their_content_and_random_weights_are_seeded(tmp_path, capsys):
    a, b = models.load("resnet18", num_classes=4), models.load("resnet18", num_classes=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    weights = tmp_path / "w.pt"
    torch.save(models.load("digits").state_dict(), weights)
    assert models.fingerprint(str(weights)).startswith("sha256:")
    out = tmp_path / "run"
    assert run(["generate", "--out", out, *FAST, "--weights", weights], capsys)[0] == 0
    state = torch.load(weights)
    state = {k: v * 1.01 for k, v in state.items()}
    torch.save(state, weights)  # same path, other weights
    code, err = run(["generate", "--out", out, *FAST, "--weights", weights, "--resume"], capsys)
    one_line_error(code, err, "--weights")


def _folder(tmp_path, count=6, size=16):
    """A labelled image folder whose labels are resnet18(seeded, 5 classes)'s own answers."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    model = models.load("resnet18", num_classes=5)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for i in range(count):
        Image.fromarray((torch.rand(size, size, 3, generator=gen) * 255).byte().numpy()).save(
            folder / f"{i}.png")
        with Image.open(folder / f"{i}.png") as img:
            x = datasets.imagenet_eval_transform(size)(img.convert("RGB"))[None]
        with torch.no_grad():
            rows.append(f"{i}.png,{int(model(x).argmax())}")
    return folder, rows


FOLDER = ["--model", "resnet18", "--num-classes", "5", "--image-size", "16", "--iterations",
          "3", "--beta", "5", "--stop", "never", "--quiet"]


def test_06_an_input_lost_between_selection_and_attack_is_recorded(tmp_path, capsys,
                                                                   monkeypatch):
    folder, rows = _folder(tmp_path)
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    real = generate._attack

    def lose_one(model, source, work, config, ranks):
        (folder / "2.png").write_bytes(b"gone bad")
        return real(model, source, work, config, ranks)

    monkeypatch.setattr(generate, "_attack", lose_one)
    out = tmp_path / "run"
    assert run(["generate", "--out", out, "--data", folder, *FOLDER], capsys)[0] == 0
    assert [r["index"] for r in manifest(out)] == [0, 1, 3, 4, 5]
    skipped = [json.loads(line) for line in open(out / "skipped.jsonl")]
    assert [s["index"] for s in skipped] == [2]
    assert skipped[0]["reason"].startswith("unreadable when attacked")


@pytest.mark.parametrize("bad", [["--beta", "nan"], ["--shard-size", "0"],
                                 ["--step", "equal-multiplier", "--beta", "0.5"]])
def test_07_bad_arguments_are_refused_before_anything_is_written(tmp_path, capsys, bad):
    out = tmp_path / "run"
    code, err = run(["generate", "--out", out, *FAST, *bad], capsys)
    one_line_error(code, err)
    assert not out.exists()
    assert run(["generate", "--out", out, *FAST], capsys)[0] == 0  # the corrected command


def test_08_bad_files_are_skipped_by_generate_and_named(tmp_path, capsys):
    from PIL import Image

    folder, rows = _folder(tmp_path, count=3)
    Image.new("L", (20000, 20000)).save(folder / "bomb.png")
    odd = os.fsencode(str(folder)) + b"/odd\xff.png"
    with open(odd, "wb") as f:
        f.write((folder / "0.png").read_bytes())
    rows += ["bomb.png,0", "odd\udcff.png,0"]
    with open(folder / "labels.csv", "wb") as f:
        f.write(b"\xef\xbb\xbf" + "\n".join(rows).encode("utf-8", "surrogateescape") + b"\n")
    out = tmp_path / "run"
    code, err = run(["generate", "--out", out, "--data", folder, *FOLDER], capsys)
    assert code == 0, err
    skipped = {os.path.basename(s["path"]): s["reason"]
               for s in map(json.loads, open(out / "skipped.jsonl"))}
    assert "DecompressionBomb" in skipped["bomb.png"]
    assert skipped["odd\\xff.png"] == "file name is not valid UTF-8"
    assert (out / "manifest.parquet").exists() and len(manifest(out)) == 3


def test_08_labels_outside_the_classes_are_refused(tmp_path, capsys):
    folder, rows = _folder(tmp_path, count=2)
    (folder / "labels.csv").write_text(f"{rows[0]}\n1.png,7\n")
    code, err = run(["generate", "--out", tmp_path / "run", "--data", folder, *FOLDER], capsys)
    one_line_error(code, err, "label 7, outside the model's classes [0, 5)")


def test_09_outputs_are_strict_json(tmp_path, capsys):
    out = tmp_path / "gen"
    assert run(["generate", "--out", out, *FAST, "--iterations", "1"], capsys)[0] == 0
    lines = (out / "manifest.jsonl").read_text().splitlines()
    rows = [strict_json(line) for line in lines]
    assert any(r["l2_at_flip"] is None for r in rows)  # unflipped: null, not NaN
    strict_json((out / "config.json").read_text())
    t1 = tmp_path / "t1"
    assert run(["table1", "--n", "3", "--iterations", "2", "--batch-size", "8", "--quiet",
                "--no-figures", "--out", t1], capsys)[0] == 0
    results = strict_json((t1 / "table1.json").read_text())["results"]
    assert any(r["time_per_image_s_std"] is None for r in results)  # one batch: no spread


def test_10_bad_weights_and_edited_files_are_one_line_errors(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint")
    code, err = run(["attack", "--out", tmp_path / "a", "--weights", junk], capsys)
    one_line_error(code, err, "cannot read weights")
    misfit = tmp_path / "misfit.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in models.load("resnet18", num_classes=3)
               .model.state_dict().items()}, str(misfit))
    code, err = run(["attack", "--out", tmp_path / "b", "--model", "resnet18", "--data", ".",
                     "--weights", misfit], capsys)
    one_line_error(code, err, "does not fit resnet18", "--num-classes")
    assert len(err) < 400
    out = tmp_path / "run"
    assert run(["generate", "--out", out, *FAST], capsys)[0] == 0
    selection = json.loads((out / "selection.json").read_text())
    selection["work"][0]["index"] = -1
    (out / "selection.json").write_text(json.dumps(selection))
    code, err = run(["generate", "--out", out, *FAST, "--resume"], capsys)
    one_line_error(code, err, "selection.json is damaged or was edited")
    (out / "config.json").write_text("{ not json")
    code, err = run(["generate", "--out", out, *FAST, "--resume"], capsys)
    one_line_error(code, err, "config.json is damaged")


def test_10_an_edited_manifest_part_is_refused_by_readers_and_redone_by_resume(tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    assert run(["generate", "--out", out, *FAST], capsys)[0] == 0
    os.remove(out / "manifest.jsonl")
    part = out / "parts" / "manifest-r000.jsonl"
    lines = part.read_text().splitlines()
    part.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="manifest-r000.jsonl: line 2 is not a valid row"):
        data.AdversarialDataset(str(out))
    assert run(["generate", "--out", out, *FAST, "--resume"], capsys)[0] == 0
    assert len(manifest(out)) == 30


def test_11_trajectory_buffers_are_sized_before_allocation():
    model = small_model()
    x = torch.rand(64, 1, 8, 8)
    with pytest.raises(ValueError, match="GiB"):
        advfast.Attack(model, iterations=10_000_000, record=True)(x, torch.zeros(64,
                                                                                 dtype=torch.long))


class SlowStart(torch.nn.Module):
    """The digits-sized CNN whose first forward takes 0.3 s, as a lazily initialised model."""

    def __init__(self):
        super().__init__()
        self.inner = small_model()
        self.started = False

    def forward(self, x):
        if not self.started:
            time.sleep(0.3)
            self.started = True
        return self.inner(x)


def test_12_table1_timing_excludes_start_up(monkeypatch):
    model = SlowStart()
    x = torch.rand(8, 1, 8, 8)
    labels = model(x).argmax(1)
    model.started = False
    chosen = selection.AttackInputs(x, labels, torch.arange(8), [""] * 8,
                                 (labels + 1) % 10, 10)
    warmed, original = [], table1.warm_up

    def spy(attacks, *args):
        original(attacks, *args)
        warmed.append((len(attacks), model.started))

    monkeypatch.setattr(table1, "warm_up", spy)
    timed = []  # for each call after the warm-up: had the slow first forward happened?

    def call(self, *args, **kwargs):
        if warmed:
            timed.append(model.started)
        return BaseAttack.__call__(self, *args, **kwargs)

    monkeypatch.setattr(Eq11, "__call__", call)
    table1.run(model, chosen, iterations=5, alpha=0.01, beta=0.5, batch_size=8,
               device=torch.device("cpu"), quiet=True)
    # all eight attacks warmed up before any timed call, and the slow first forward was theirs
    assert warmed == [(8, True)] and timed and all(timed)


def _unclassifiable_folder(tmp_path):
    folder, rows = _folder(tmp_path, count=3)
    wrong = [f"{r.split(',')[0]},{(int(r.split(',')[1]) + 1) % 5}" for r in rows]
    (folder / "labels.csv").write_text("\n".join(wrong) + "\n")
    return folder


@pytest.mark.parametrize("command", ["attack", "table1", "generate"])
def test_13_nothing_eligible_is_a_clear_error(tmp_path, capsys, command):
    folder = _unclassifiable_folder(tmp_path)
    code, err = run([command, "--out", tmp_path / "out", "--data", folder, "--model",
                     "resnet18", "--num-classes", "5", "--image-size", "16", "--iterations", "3",
                     "--quiet"], capsys)
    one_line_error(code, err, "nothing to attack")


def test_14_a_non_empty_out_needs_overwrite_and_foreign_files_are_kept(tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "t1"
    base = ["table1", "--n", "3", "--iterations", "2", "--quiet", "--out", out]
    assert run(base, capsys)[0] == 0
    assert (out / "fig1.png").exists()

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the folder was checked")

    monkeypatch.setattr(models, "load", no_work)
    monkeypatch.setattr("advfast.cli.options.models.load", no_work)
    code, err = run(base, capsys)
    one_line_error(code, err, "not empty", "--overwrite")  # refused before any work
    monkeypatch.undo()
    before = (out / "table1.json").read_bytes()
    code, err = run(base + ["--overwrite", "--weights", tmp_path / "missing.pt"], capsys)
    one_line_error(code, err)
    assert (out / "table1.json").read_bytes() == before  # a failed run removes nothing
    assert (out / "fig1.png").exists()
    assert run(base + ["--overwrite", "--no-figures"], capsys)[0] == 0
    assert not (out / "fig1.png").exists()  # the old figures do not sit beside a new table
    (out / "fig2.png").write_bytes(b"the user's own picture")
    code, err = run(base + ["--overwrite"], capsys)
    one_line_error(code, err, "fig2.png was not written by advfast")
    assert (out / "fig2.png").read_bytes() == b"the user's own picture"
    attack_out = tmp_path / "a"
    attack_out.mkdir()
    (attack_out / "keep.txt").write_text("x")
    code, err = run(["attack", "--n", "2", "--iterations", "2", "--quiet", "--out", attack_out],
                    capsys)
    one_line_error(code, err, "not empty")


def test_16_smaller_cases(tmp_path, capsys):
    code, err = run(["attack", "--out", tmp_path / "x", "--alpha", "0.1"], capsys)
    one_line_error(code, err, "--alpha is the equal-multiplier step")
    code, err = run(["attack", "--out", tmp_path / "x", "--weights", "IMAGENET1K_V1"], capsys)
    one_line_error(code, err, "digits model takes a weights file")
    (tmp_path / "f").write_text("x")
    code, err = run(["attack", "--out", tmp_path / "x", "--model", "resnet18", "--data",
                     tmp_path / "f"], capsys)
    one_line_error(code, err, "is a file, not an image folder")
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and advfast.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "(default: 1024)" in capsys.readouterr().out
    out = tmp_path / "png"
    assert run(["attack", "--n", "2", "--iterations", "3", "--quiet", "--png", "--out", out],
               capsys)[0] == 0
    from PIL import Image

    with Image.open(next((out / "png").iterdir())) as img:
        assert img.mode == "L" and img.size == (8, 8)  # grey, so it reads back as digits input
    gen = tmp_path / "gen"
    assert run(["generate", "--out", gen, *FAST], capsys)[0] == 0
    shard = next((gen / "shards").iterdir())
    mode = stat.S_IMODE(os.stat(shard).st_mode)
    assert mode == stat.S_IMODE(os.stat(gen / "manifest.jsonl").st_mode) and mode & 0o044


def test_16_table_shows_no_nan():
    cell = table1.Cell("equal-multiplier", "ce", torch.tensor([-1, -1]),
                       {k: torch.full((2,), math.nan) for k in ("l1", "l2", "linf")}, {},
                       [0.1], [1.0], [10.0])
    cells = [table1.Cell(step, loss, cell.first_flip, cell.at_flip, {}, [0.1], [1.0], [10.0])
             for step in ("equal-multiplier", "equal-perturbation")
             for loss in ("ce", "ce-sign", "logit", "m-logit")]
    text = table1.format_table(cells, 0.1, 0.2)
    assert "nan" not in text and "n/a" in text


def test_table1_time_columns_say_how_trustworthy_they_are():
    nan = {k: torch.full((2,), math.nan) for k in ("l1", "l2", "linf")}

    def cells(seconds):
        return [table1.Cell(step, loss, torch.tensor([-1, -1]), nan, {}, seconds, [8, 8, 2],
                            [1.0]) for step in ("equal-multiplier", "equal-perturbation")
                for loss in ("ce", "ce-sign", "logit", "m-logit")]

    steady, noisy = cells([0.80, 0.82, 0.2]), cells([0.5, 1.5, 0.2])
    assert steady[0].summary()["images_per_s"] == pytest.approx(18 / 1.82)  # not a mean of rates
    assert steady[0].summary()["time_spread"] == pytest.approx(
        torch.tensor([0.1, 0.1025]).std().item() / 0.10125)
    assert "warning" not in table1.format_table(steady, 0.1, 0.2)
    assert "warning: the time per image varies by up to 71%" in table1.format_table(noisy, 0.1,
                                                                                    0.2)


def test_table1_paired_differences_follow_the_samples():
    nan = {k: torch.full((4,), math.nan) for k in ("l1", "l2", "linf")}
    flips = {"ce": [10, 12, 11, 13], "logit": [20, 21, 22, 23], "m-logit": [20, 22, 21, 24],
             "ce-sign": [5, -1, 6, 7]}
    cells = [table1.Cell(step, loss, torch.tensor(flips[loss]), nan, {}, [0.1], [4], [1.0])
             for step in ("equal-multiplier", "equal-perturbation") for loss in flips]
    rows = {(r["step"], r["a"], r["b"]): r for r in table1.paired_differences(cells)}
    first = rows[("equal-perturbation", "ce", "logit")]
    assert first["n"] == 4 and first["mean"] == pytest.approx(10.0)
    assert first["se"] == pytest.approx(torch.tensor([10., 9, 11, 10]).std().item() / 2)
    assert first["verdict"] == "as the paper"
    assert rows[("equal-perturbation", "logit", "m-logit")]["verdict"] == "tie"
    last = rows[("equal-perturbation", "m-logit", "ce-sign")]
    assert last["n"] == 3 and last["verdict"] == "reversed"  # the unflipped sample left out
