"""``advfast bench``: the table, the JSON, the peers, --nsys without nsys."""

import json
import shutil

import pytest

from advfast import cli


def test_bench_measures_floor_advfast_and_peers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--iterations", "2", "--repeats", "2", "--batch-size", "4", "8",
                     "--compile", "none", "aot_eager", "--peers", "torchattacks,foolbox",
                     "--quiet", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| 4 | floor |" in printed and "| 8 | advfast aot_eager, record off |" in printed
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["results"]] == [4, 8]
    configs = report["results"][0]["configs"]
    assert configs["floor"]["ratio_to_floor"] == pytest.approx(1.0)
    ours = configs["advfast, record on"]
    assert len(ours["samples"]) == 2 and ours["ms_per_iteration"] > 0
    assert set(ours["phases_ms"]) == {"forward", "head", "backward", "update"}
    assert 0 < ours["own_work_percent_of_floor"] < 100
    assert "torchattacks" in configs or "torchattacks" in report["results"][0]["notes"]
    assert report["versions"]["torch"] and report["hardware"]["threads"] >= 1


def test_bench_runs_cw_and_lbfgs_without_peers(capsys):
    for attack in ("cw-l2", "lbfgs"):
        assert cli.main(["bench", "--attack", attack, "--iterations", "2", "--repeats", "1",
                         "--batch-size", "4", "--peers", "none", "--quiet"]) == 0
    assert "advfast, record off" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("nsys") is not None, reason="nsys is installed here")
def test_nsys_missing_is_a_clear_error(capsys):
    assert cli.main(["bench", "--nsys", "--iterations", "1"]) == 2
    err = capsys.readouterr().err
    assert "nsys on the PATH" in err and len(err.strip().splitlines()) == 1


def test_options_that_would_change_nothing_are_refused(capsys):
    assert cli.main(["bench", "--stop", "flip", "--iterations", "1"]) == 2
    assert "--stop would change nothing" in capsys.readouterr().err
    assert cli.main(["bench", "--attack", "cw-l2", "--warm-start", "--iterations", "1"]) == 2
    assert "--warm-start would change nothing" in capsys.readouterr().err


def test_bench_shows_every_configuration_against_the_fp32_eager_floor(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--iterations", "2", "--repeats", "2", "--batch-size", "4",
                     "--amp", "bf16", "--channels-last", "--peers", "none", "--quiet",
                     "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    configs = report["results"][0]["configs"]
    fp32 = configs["floor, fp32 eager"]
    assert fp32["ratio_to_fp32_floor"] == pytest.approx(1.0)
    for name, row in configs.items():  # each against its own floor and against fp32's
        assert row["ratio_to_fp32_floor"] == pytest.approx(
            row["ms_per_iteration"] / fp32["ms_per_iteration"])
        assert row["ratio_to_floor"] == pytest.approx(
            row["ms_per_iteration"] / configs["floor"]["ms_per_iteration"])
    assert report["hardware"]["cpu_bf16"] in ("amx", "avx512_bf16", "none", "unknown")
    assert "vs fp32 floor" in printed and "bf16:" in printed
