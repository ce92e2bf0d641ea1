"""Nothing lost under attack: no unpickling, nothing reached through a symbolic link or a
recorded path outside the output folder, datasets that refuse damage, and a folder that a
failed command leaves usable.  Every case plants what a hostile folder would hold (no root
needed: links into a temporary folder) and checks that the victim file is untouched."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from advfast import cli, data
from advfast.errors import FolderRefused, UserError
from advfast.experiments import detect
from advfast.io import datasets, files
from advfast.io.files import FolderLock

FAST = ["--n", "12", "--iterations", "30", "--batch-size", "8", "--quiet"]
ATTACK = ["attack", "--n", "4", "--iterations", "3", "--quiet"]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def refused(code, err, *fragments):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module", autouse=True)
def trained_digits_model():
    """Trains (or reads) the digits model once, so that its one-time note is not part of the
    messages checked below."""
    from advfast import models

    models.load("digits")


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("precious")
    os.chmod(path, 0o600)
    return path


def untouched(victim):
    assert victim.read_text() == "precious" and (victim.stat().st_mode & 0o777) == 0o600


class Planted:
    """An object whose unpickling runs code: it creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    marker, checkpoint = tmp_path / "ran", tmp_path / "planted.pt"
    torch.save({"epoch": 1, "model": {}, "optimizer": Planted(str(marker))}, checkpoint)
    with pytest.raises(FolderRefused, match="cannot be read safely") as err:
        detect.read_checkpoint(str(checkpoint), torch.device("cpu"))
    assert not marker.exists() and len(str(err.value).splitlines()) == 1


def test_a_truncated_checkpoint_says_what_to_do(tmp_path):
    checkpoint = tmp_path / "cut.pt"
    torch.save({"epoch": 1, "model": {"w": torch.ones(3)}, "optimizer": {}}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:40])
    with pytest.raises(FolderRefused, match="remove it to train that detector afresh"):
        detect.read_checkpoint(str(checkpoint), torch.device("cpu"))


def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path, capsys, victim):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    refused(*run(["generate", "--out", out, *FAST], capsys), "symbolic link")
    untouched(victim)
    refused(*run(["generate", "--out", out, *FAST, "--resume"], capsys), "symbolic link")
    untouched(victim)


def test_a_symlinked_temporary_name_is_refused_and_its_target_untouched(tmp_path, capsys,
                                                                          victim):
    out = tmp_path / "run"
    assert run([*ATTACK, "--out", out], capsys)[0] == 0
    (out / ".metrics.csv.advfast-tmp").symlink_to(victim)
    refused(*run([*ATTACK, "--out", out, "--overwrite"], capsys), "symbolic link")
    untouched(victim)


def test_a_symlinked_output_name_is_refused(tmp_path, capsys, victim):
    out = tmp_path / "run"
    assert run([*ATTACK, "--out", out], capsys)[0] == 0
    os.remove(out / "metrics.csv")
    (out / "metrics.csv").symlink_to(victim)
    refused(*run([*ATTACK, "--out", out, "--overwrite"], capsys), "symbolic link")
    untouched(victim)


def test_a_recorded_name_outside_the_folder_is_refused_and_nothing_deleted(tmp_path, capsys,
                                                                           victim):
    out = tmp_path / "run"
    assert run([*ATTACK, "--out", out], capsys)[0] == 0
    escape = os.path.relpath(victim, out / "png")
    (out / ".advfast-files.json").write_text(json.dumps({"files": [f"png/{escape}"]}))
    refused(*run([*ATTACK, "--out", out, "--overwrite"], capsys), "is damaged")
    untouched(victim)


def test_a_second_attack_on_a_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = FolderLock(str(out))
    holder.acquire(first=True)
    try:
        refused(*run([*ATTACK, "--out", out], capsys), "another advfast run")
    finally:
        holder.release()
    assert run([*ATTACK, "--out", out], capsys)[0] == 0


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    assert cli.main(["generate", "--out", str(out), "--shard-size", "5", *FAST]) == 0
    return out


def copy_of(generated, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(generated, target)
    return target


def test_resume_never_deletes_through_a_recorded_shard_path(generated, tmp_path, capsys,
                                                             victim):
    out = copy_of(generated, tmp_path)
    for name in ("manifest.jsonl", "manifest.parquet", "skipped.jsonl"):
        os.remove(out / name)
    part = out / "parts" / "manifest-r000.jsonl"
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    rows[0]["shard"] = os.path.relpath(victim, out)  # "../victim.txt"
    rows[1]["shard"] = str(victim)                    # absolute
    part.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run(["generate", "--out", out, "--shard-size", "5", *FAST, "--resume"], capsys)[0] == 0
    untouched(victim)
    assert len(data.AdversarialDataset(str(out), verify=True)) == 12  # both rows redone


def test_a_symlinked_shards_folder_is_refused(generated, tmp_path, capsys):
    out = copy_of(generated, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    os.rename(out / "shards", elsewhere)
    (out / "shards").symlink_to(elsewhere)
    refused(*run(["generate", "--out", out, "--shard-size", "5", *FAST, "--resume"], capsys),
            "symbolic link")
    assert sorted(os.listdir(elsewhere)) == sorted(os.listdir(generated / "shards"))


def test_a_garbled_manifest_part_line_is_redone_on_resume(generated, tmp_path, capsys):
    out = copy_of(generated, tmp_path)
    os.remove(out / "manifest.jsonl")
    part = out / "parts" / "manifest-r000.jsonl"
    lines = part.read_text().splitlines()
    lines[3] = "{ garbled"
    part.write_text("\n".join(lines) + "\n")
    with pytest.raises(FolderRefused, match="line 4 is not a valid row"):
        data.AdversarialDataset(str(out))
    assert run(["generate", "--out", out, "--shard-size", "5", *FAST, "--resume"], capsys)[0] == 0
    assert len(data.AdversarialDataset(str(out), verify=True)) == 12


def test_the_dataset_refuses_a_torn_or_short_manifest(generated, tmp_path):
    out = copy_of(generated, tmp_path)
    manifest = out / "manifest.jsonl"
    text = manifest.read_text()
    manifest.write_text(text[:-10])  # torn last line
    with pytest.raises(FolderRefused, match="torn"):
        data.AdversarialDataset(str(out))
    manifest.write_text("".join(text.splitlines(keepends=True)[:-1]))  # cut at a line end
    with pytest.raises(FolderRefused, match="cut or edited"):
        data.AdversarialDataset(str(out))


def _edit_shard(out, edit):
    name = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["shard"]
    tensors = load_file(out / name)
    edit(tensors)
    save_file(tensors, out / name)
    for path in (out / "parts").iterdir():  # the recorded size: so only the contents are wrong
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            if r.get("shard") == name:
                r["shard_bytes"] = (out / name).stat().st_size
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for r in manifest:
        if r["shard"] == name:
            r["shard_bytes"] = (out / name).stat().st_size
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.update(index=t["index"].flip(0)), "does not hold input"),
    (lambda t: t.update(adversarial=t["adversarial"].double()), "does not hold advfast's"),
    (lambda t: t.update(adversarial=t["adversarial"][..., :2].contiguous()), "of shape"),
    (lambda t: t.update(adversarial=t["adversarial"] * 3), "outside \\[0, 1\\]"),
    (lambda t: t.pop("index"), "does not hold advfast's"),
])
def test_the_dataset_refuses_a_swapped_or_forged_shard(generated, tmp_path, damage, message):
    out = copy_of(generated, tmp_path)
    _edit_shard(out, damage)
    dataset = data.AdversarialDataset(str(out))
    with pytest.raises(FolderRefused, match=message):
        [dataset[i] for i in range(len(dataset))]


def test_an_offset_out_of_range_is_refused(generated, tmp_path):
    out = copy_of(generated, tmp_path)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    manifest[0]["offset"] = 99
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    with pytest.raises(FolderRefused, match="does not hold input"):
        data.AdversarialDataset(str(out))[0]
    manifest[0]["offset"] = -1
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    with pytest.raises(FolderRefused, match="not a valid row"):
        data.AdversarialDataset(str(out))


def test_items_collate_with_the_default_dataloader(generated):
    dataset = data.AdversarialDataset(str(generated))
    batch = next(iter(DataLoader(dataset, batch_size=8)))
    assert batch["adversarial"].shape[0] == 8 and batch["index"].dtype == torch.int64
    assert all(v is not None for v in batch.values())


@pytest.mark.parametrize("argv, fragment", [
    (["generate", "--attack", "cw-l2", "--iterations", "0"], "--iterations"),
    (["generate", "--attack", "cw-l2", "--kappa", "-1"], "kappa"),
    (["generate", "--attack", "ifgs", "--eps", "0"], "eps"),
    (["generate", "--model", "not-a-model"], "not-a-model"),
    (["generate", "--weights", "/nonexistent/w.safetensors"], "w.safetensors"),
    (["attack", "--attack", "cw-l2", "--iterations", "0"], "--iterations"),
    (["attack", "--model", "not-a-model"], "not-a-model"),
    (["table1", "--model", "not-a-model"], "not-a-model"),
])
def test_a_failed_command_leaves_nothing_that_refuses_the_corrected_one(tmp_path, capsys, argv,
                                                                        fragment):
    out = tmp_path / "run"
    refused(*run([*argv, "--out", out, "--quiet"], capsys), fragment)
    assert not out.exists()
    corrected = ["attack", *ATTACK[1:]] if argv[0] != "generate" else ["generate", *FAST]
    assert run([*corrected, "--out", out], capsys)[0] == 0


def test_detect_checks_its_sources_before_writing(tmp_path, capsys):
    out = tmp_path / "det"
    refused(*run(["detect", "--from", f"ce={tmp_path / 'missing'}", "--out", out, "--quiet"],
                 capsys), "missing")
    assert not (out / "detect.json").exists()


def test_a_copied_detect_folder_has_the_same_identity(tmp_path):
    from advfast.cli.detect import _identity

    def config(out):
        return detect.DetectConfig(out=str(out), sources={"ce": str(out / "adversarial" / "ce")})

    assert _identity(config(tmp_path / "a")) == _identity(config(tmp_path / "b" / "moved"))


def test_labels_csv_names_stay_inside_the_folder(tmp_path, victim):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "labels.csv").write_text(f"../{victim.name},0\n")
    with pytest.raises(UserError, match="not a file name inside"):
        datasets.ImageFiles(str(tmp_path / "imgs"))
    (tmp_path / "imgs" / "labels.csv").write_text(f"{victim},0\n")
    with pytest.raises(UserError, match="not a file name inside"):
        datasets.ImageFiles(str(tmp_path / "imgs"))


def test_inside_refuses_every_way_out(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for name in ("../x", "/etc/passwd", "a/../../x", "", "a//b", "link/x", "link"):
        with pytest.raises(FolderRefused):
            files.inside(str(tmp_path), name)
    assert files.inside(str(tmp_path), "real/x") == str(tmp_path / "real" / "x")


def test_a_huge_constant_names_its_option(tmp_path, capsys):
    refused(*run(["attack", "--attack", "cw-l2", "--c", "1e308", "--out", tmp_path / "r",
                  "--quiet"], capsys), "c must be at most")
