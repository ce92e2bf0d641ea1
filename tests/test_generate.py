"""``advfast generate``: continuous batching, durable shards, resume, refusals, torchrun."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import advfast
from advfast import cli, data, models
from advfast.io import datasets
from conftest import list_feed
from test_attack import small_model

FAST = ["--n", "60", "--iterations", "40", "--beta", "0.5", "--batch-size", "16", "--shard-size", "7",
        "--compact-every", "2", "--quiet"]


def generate(out, *extra):
    return cli.main(["generate", "--out", str(out), *FAST, *extra])


def manifest(out):
    return [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]


def test_stream_equals_each_sample_alone():
    """Continuous batching: the same first flip and image as attacking each sample alone."""
    model = small_model(gain=3.0)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(11, 1, 8, 8, generator=gen)
    source = model(images).argmax(1)
    target = (source + 1 + torch.randint(0, 9, (11,), generator=gen)) % 10
    attack = advfast.Attack(model, loss="ce", step="equal-perturbation", beta=1.0,
                            iterations=30, stop="flip", compact_every=3)
    results = {}
    stream = attack.stream(list_feed(images, target, source), capacity=4)
    for done in stream:
        for j, key in enumerate(done.key.tolist()):
            results[key] = (int(done.first_flip[j]), done.adversarial[j])
    assert sorted(results) == list(range(11))
    assert stream.timing.batch_size == 11
    for i in range(11):
        alone = attack(images[i:i + 1], target[i:i + 1], source[i:i + 1])
        assert results[i][0] == int(alone.first_flip[0])
        torch.testing.assert_close(results[i][1], alone.adversarial[0], atol=1e-5, rtol=0)
    assert any(results[i][0] > 0 for i in results)


def test_generate_writes_shards_manifest_and_dataset(tmp_path):
    out = tmp_path / "run"
    assert generate(out) == 0
    rows = manifest(out)
    assert len(rows) == 60 and len({r["index"] for r in rows}) == 60
    assert [r["index"] for r in rows] == sorted(r["index"] for r in rows)
    assert all(r["target"] != r["label"] for r in rows)
    assert sum(r["flipped"] for r in rows) > 30
    shard_files = sorted(glob.glob(str(out / "shards" / "*.safetensors")))
    assert len(shard_files) == 9  # 60 samples in shards of 7
    config = json.loads((out / "config.json").read_text())
    assert config["arguments"]["params"]["loss"] == "ce" and config["arguments"]["n"] == 60
    assert config["arguments"]["attack"] == "eq11"

    import pandas
    import pyarrow.parquet as pq

    frame = pandas.read_json(out / "manifest.jsonl", lines=True)
    assert len(frame) == 60 and {"shard", "offset", "l2_at_flip", "first_flip"} <= set(frame)
    assert pq.read_table(out / "manifest.parquet").num_rows == 60

    dataset = data.AdversarialDataset(str(out))
    assert len(dataset) == 60
    item = dataset[5]
    assert item["adversarial"].shape == (1, 8, 8) and item["adversarial"].dtype == torch.float32
    assert item["index"] == rows[5]["index"] and item["label"] == rows[5]["label"]
    images, labels = data.digits("all")
    delta = (item["adversarial"] - images[item["index"]]).abs()
    assert delta.sum().item() == pytest.approx(rows[5]["l1_final"], rel=1e-4)
    # the model really is fooled where the manifest says so
    model = models.load("digits")
    with torch.no_grad():
        preds = model(torch.stack([dataset[i]["adversarial"] for i in range(60)])).argmax(1)
    flipped = torch.tensor([r["flipped"] for r in rows])
    hits = preds == torch.tensor([r["target"] for r in rows])
    assert hits[flipped].float().mean() > 0.9


def test_refusals(tmp_path, capsys):
    out = tmp_path / "run"
    assert generate(out) == 0
    assert generate(out) == 2
    assert "not empty" in capsys.readouterr().err
    assert generate(out, "--resume", "--loss", "logit") == 2
    assert "--loss" in capsys.readouterr().err
    assert generate(out, "--resume") == 0  # same arguments: nothing left to do
    assert len(manifest(out)) == 60


def test_corrupt_image_is_skipped_and_recorded(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    model = models.load("resnet18", num_classes=5)
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(weights))
    rows = []
    gen = torch.Generator().manual_seed(1)
    for i in range(5):
        Image.fromarray((torch.rand(16, 16, 3, generator=gen) * 255).byte().numpy()).save(
            folder / f"{i}.png")
        with Image.open(folder / f"{i}.png") as img:
            x = datasets.imagenet_eval_transform(16)(img.convert("RGB"))[None]
        with torch.no_grad():
            rows.append(f"{i}.png,{int(model(x).argmax())}")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    (folder / "labels.csv").write_text("\n".join(rows + ["broken.png,0"]) + "\n")
    out = tmp_path / "run"
    code = cli.main(["generate", "--model", "resnet18", "--weights", str(weights),
                     "--num-classes", "5", "--data", str(folder), "--image-size", "16",
                     "--iterations", "3", "--beta", "5", "--stop", "never", "--out", str(out),
                     "--quiet"])
    assert code == 0
    assert len(manifest(out)) == 5
    skipped = [json.loads(line) for line in open(out / "skipped.jsonl")]
    assert [s["path"] for s in skipped] == [str(folder / "broken.png")]


def test_png_format_holds_after_quantisation(tmp_path):
    out = tmp_path / "png"
    assert generate(out, "--format", "png", "--stop", "flip") == 0
    rows = manifest(out)
    assert all(os.path.exists(out / r["png"]) for r in rows)
    model = models.load("digits")
    from PIL import Image

    holds = []
    for r in rows:
        with Image.open(out / r["png"]) as img:
            x = torch.from_numpy(np.array(img.convert("L"))).float().view(1, 1, 8, 8)
        with torch.no_grad():
            holds.append(int(model(x / 255).argmax()) == r["target"])
    assert holds == [r["png_holds"] for r in rows]
    assert sum(holds) > 30
    # the manifest describes the float image that was saved
    dataset = data.AdversarialDataset(str(out))
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([dataset[i]["adversarial"]
                                                 for i in range(len(rows))])), 1)
    saved = probs[torch.arange(len(rows)), torch.tensor([r["target"] for r in rows])]
    torch.testing.assert_close(saved, torch.tensor([r["target_prob_final"] for r in rows]),
                               atol=1e-4, rtol=0)


def _unfinished(out):
    return glob.glob(str(out / "**" / ".*.advfast-tmp"), recursive=True)


def test_kill_9_then_resume_produces_every_input_once(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "advfast", "generate", "--out", str(out), "--n", "200",
            "--iterations", "120", "--batch-size", "8", "--shard-size", "3", "--compact-every",
            "2", "--stop", "never", "--quiet"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, env=env)
    part = out / "parts" / "manifest-r000.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not part.exists() or part.stat().st_size < 2000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert part.exists(), "the run never wrote a shard before being killed"
    before = len(open(part).readlines())
    assert 0 < before < 200
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = manifest(out)
    assert sorted(r["index"] for r in rows) == sorted({r["index"] for r in rows})
    assert len(rows) == 200
    from safetensors.torch import load_file

    for path in glob.glob(str(out / "shards" / "*.safetensors")):
        load_file(path)  # every shard reads back
    assert not _unfinished(out)
    dataset = data.AdversarialDataset(str(out))
    assert len(dataset) == 200 and dataset[199]["adversarial"].shape == (1, 8, 8)


def test_torchrun_two_processes_equal_one(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ["--num-inputs", "40", "--iterations", "30", "--beta", "0.5", "--batch-size", "8",
              "--shard-size", "5", "--quiet", "--device", "cpu"]
    assert cli.main(["generate", "--out", str(single), *common]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(29500 + os.getpid() % 1000), "-m", "advfast", "generate",
                "--out", str(multi), *common]
    done = subprocess.run(torchrun, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = manifest(single), manifest(multi)
    assert [r["index"] for r in a] == [r["index"] for r in b]
    assert len({r["index"] for r in b}) == 40
    assert {os.path.basename(r["shard"])[:10] for r in b} == {"shard-r000", "shard-r001"}
    for ra, rb in zip(a, b):
        assert (ra["target"], ra["first_flip"], ra["steps"]) == (rb["target"], rb["first_flip"],
                                                                 rb["steps"])
    da, db = data.AdversarialDataset(str(single)), data.AdversarialDataset(str(multi))
    for i in range(40):
        torch.testing.assert_close(da[i]["adversarial"], db[i]["adversarial"], atol=1e-5, rtol=0)


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert generate(blocker / "out") == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Not a directory" in err and str(blocker) in err
    assert generate(blocker) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def _full_disk(monkeypatch, after_writes=0):
    """Every shard write after the first ``after_writes`` fails half-way with ENOSPC."""
    import errno

    from advfast.io import shards

    real, calls = shards.write_bytes, []

    def write(path, payload):
        calls.append(path)
        if len(calls) <= after_writes:
            return real(path, payload)
        with open(path, "wb") as f:
            f.write(payload[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "write_bytes", write)


@pytest.mark.parametrize("shard_size", ["7", "1000"], ids=["mid-run", "last-flush"])
def test_full_disk_stops_cleanly_and_never_hangs(tmp_path, monkeypatch, capsys, shard_size):
    """A full disk in the middle of the run or in the final flush (which used to hang the
    writer thread forever) ends with one clear error and no half-written shard."""
    import threading

    _full_disk(monkeypatch, after_writes=1 if shard_size == "7" else 0)
    out = tmp_path / "run"
    codes = []
    worker = threading.Thread(target=lambda: codes.append(
        generate(out, "--shard-size", shard_size)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "generate hung on a full disk"
    assert codes == [2]
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert not _unfinished(out)
    from advfast.io import shards

    assert not shards.shard_problems(str(out), shards.recorded_rows(str(out)))
