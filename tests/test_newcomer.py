"""A newcomer's first hour: defaults that work on the default model, progress on long runs,
a fast default on a shared machine, messages that say what to do."""

import csv
import json
import os

import pytest

from advfast import cli, models
from advfast.attacks import CarliniWagnerL2
from advfast.engine import runtime
from advfast.io import selection


@pytest.fixture(scope="module")
def digits():
    model = models.load("digits")
    chosen, _ = selection.prepare(model, selection.DigitsSource("test"), 8, seed=0)
    return model, chosen


def test_ifgs_defaults_flip_the_default_model(tmp_path, capsys):
    assert cli.main(["attack", "--attack", "ifgs", "--n", "16", "--out", str(tmp_path / "r"),
                     "--quiet"]) == 0
    with open(tmp_path / "r" / "metrics.csv") as f:
        flipped = sum(row["flipped"] == "True" for row in csv.DictReader(f))
    params = json.loads((tmp_path / "r" / "summary.json").read_text())["config"]["params"]
    assert params["eps"] == pytest.approx(0.3) and params["alpha"] == pytest.approx(0.03)
    assert flipped >= 12  # 8/255, the ImageNet default, flips none of them


def test_a_run_where_nothing_flips_says_which_option_to_raise(tmp_path, capsys):
    assert cli.main(["attack", "--attack", "ifgs", "--eps", "0.001", "--n", "8",
                     "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "note: no input flipped; raise --eps" in err


def test_searches_report_progress_within_a_call(digits):
    model, chosen = digits
    attack = CarliniWagnerL2(model, c=1e-2, steps=20, binary_search_steps=3, compact_every=4)
    heard = []
    attack.progress = lambda iterations, finished: heard.append((iterations, finished))
    result = attack(chosen.images, chosen.targets)
    iterations = [i for i, _ in heard]
    assert len(heard) >= 10 and iterations == sorted(iterations)
    assert heard[-1][1] == len(chosen.targets) == len(result.steps)
    assert all(0 <= done <= len(chosen.targets) for _, done in heard)


def test_the_attack_bar_moves_within_a_batch(tmp_path, capsys):
    assert cli.main(["attack", "--attack", "cw-l2", "--iterations", "20",
                     "--binary-search-steps", "2", "--n", "8", "--out",
                     str(tmp_path / "r")]) == 0
    assert "batch at iteration" in capsys.readouterr().err


@pytest.mark.parametrize("load, expected", [(0.0, 4), (0.4, 4), (1.2, 3), (3.6, 1), (9.0, 1)])
def test_default_threads_leave_the_busy_cores_to_other_jobs(monkeypatch, load, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    assert runtime.default_threads() == expected


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert runtime.default_threads() == 3


def test_the_command_line_lets_idle_openmp_threads_sleep():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import advfast.cli, os, sys; print(os.environ['OMP_WAIT_POLICY'], 'torch' in " \
           "sys.modules)"
    out = subprocess.run([sys.executable, "-c", "import sys; import advfast; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    assert out == ["False"]  # importing advfast does not load torch (so the CLI can first ...)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    assert out == ["PASSIVE", "True"]  # ... set the policy that torch's OpenMP then reads


def test_compile_on_the_cpu_prints_no_cuda_warning(tmp_path, capfd):
    assert cli.main(["attack", "--compile", "default", "--n", "2", "--iterations", "2",
                     "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert "CUDA_HOME" not in capfd.readouterr().err


def _rgb_folder(root):
    from PIL import Image
    import numpy as np

    (root / "cat").mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(
        root / "cat" / "a.png")
    return root


def test_a_model_that_does_not_fit_the_folder_is_one_line_before_any_work(tmp_path, capsys,
                                                                          digits):
    folder = _rgb_folder(tmp_path / "imgs")
    out = tmp_path / "r"
    code = cli.main(["attack", "--data", str(folder), "--n", "1", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "cannot take 1x224x224 images" in err and "grey 8x8 images (--image-size 8)" in err
    assert not out.exists()
    # what it says to do works: the digits model on the folder at image size 8
    assert cli.main(["attack", "--data", str(folder), "--image-size", "8", "--n", "1",
                     "--out", str(out), "--quiet"]) in (0, 2)


def test_a_missing_folder_is_the_error_reported_first(tmp_path, capsys):
    code = cli.main(["attack", "--data", str(tmp_path / "nowhere"), "--out",
                     str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere does not exist" in err and "cannot take" not in err


def test_a_missing_weights_file_is_called_missing(tmp_path, capsys):
    code = cli.main(["attack", "--weights", str(tmp_path / "w.safetensors"), "--out",
                     str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "w.safetensors does not exist" in err
