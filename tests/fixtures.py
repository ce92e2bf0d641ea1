"""The small models, batches, image folders and feeds the tests share, in one place.

Each is written here with plain PyTorch (no advfast code) unless it is a helper around
advfast's own API (:func:`labelled_folder` labels images with the model under test)."""

from __future__ import annotations

import os

import torch
from torch import nn

# The two step rules of Eq. 11 and a step size that moves the small models' predictions.
RULES = {"equal-multiplier": dict(alpha=0.02), "equal-perturbation": dict(beta=1.0)}


# --- models ---------------------------------------------------------------------------------

def small_model(seed: int = 1, gain: float = 1.0) -> nn.Module:
    """A random CNN on 1x8x8 inputs (10 classes); a larger gain gives more confident
    predictions."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 8 * 8, 10)).eval()
    with torch.no_grad():
        model[-1].weight.mul_(gain)
    return model


def two_pixel_model() -> nn.Module:
    """logits = (pixel a, pixel b): class 1 wins once pixel b exceeds pixel a."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
    return model.eval()


class BNModel(nn.Module):
    """A CNN with batch normalisation on 1x8x8 inputs: it has running statistics to spoil."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class RGBModel(nn.Module):
    """3-channel convolutions on 3x8x8 inputs, so channels_last changes the weights' strides;
    ``seen`` keeps every input of the convolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)
        self.seen: list[torch.Tensor] = []
        self.conv.register_forward_hook(lambda m, args, out: self.seen.append(args[0]))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class NaNAbove(nn.Module):
    """The two-pixel model, whose logits are NaN once pixel b exceeds 0.5."""

    def __init__(self):
        super().__init__()
        self.inner = two_pixel_model()

    def forward(self, x):
        logits = self.inner(x)
        return torch.where(x.flatten(1)[:, 1:2] > 0.5, float("nan"), logits)


class Smooth(nn.Module):
    """A small tanh MLP on 1x6x6 images: smooth, so optimisers agree on where they go."""

    def __init__(self, seed=3, classes=5):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.Tanh(), nn.Linear(24, classes))
        with torch.no_grad():
            self.net[3].weight.mul_(3)

    def forward(self, x):
        return self.net(x)


class Constant(nn.Module):
    """Predicts class 5 of 10 for everything; one convolution, so it has an input channel
    count."""

    def __init__(self, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), 5), 10).float()


class CountingModel(nn.Module):
    """Wraps a model and counts its forward calls."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


# --- batches ----------------------------------------------------------------------------------

def small_batch(model, n=6, seed=0):
    """n random 1x8x8 images, a target other than the model's prediction, the prediction."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=gen)
    with torch.no_grad():
        source = model(x).argmax(1)
    target = (source + torch.randint(1, 10, (n,), generator=gen)) % 10
    return x, target, source


def smooth_batch(model, n=6, seed=0, classes=5):
    """n random 1x6x6 images for :class:`Smooth`: images, targets, the model's predictions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=gen)
    with torch.no_grad():
        source = model(x).argmax(1)
    target = (source + 1 + torch.randint(0, classes - 1, (n,), generator=gen)) % classes
    return x, target, source


def rgb_batch(model, n=5):
    """n random 3x8x8 images and a target other than the model's prediction."""
    x0 = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return x0, (model(x0).argmax(1) + 3) % 10


def list_feed(images, target, source):
    """A feed for Attack.stream over the given samples, keyed by their position."""
    queue = list(range(len(images)))

    def feed(k):
        take, queue[:] = queue[:k], queue[k:]
        if not take:
            return None
        idx = torch.tensor(take)
        return images[idx], target[idx], source[idx], idx

    return feed


# --- image folders ----------------------------------------------------------------------------

def write_images(folder, count, size=(12, 10), seed=0):
    """``count`` random RGB PNGs img0.png... of ``size`` (width, height) in ``folder``."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = (torch.rand(size[1], size[0], 3, generator=gen) * 255).byte().numpy()
        path = os.path.join(folder, f"img{i}.png")
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def labelled_folder(root, model, count=6, size=16, seed=1):
    """A folder root/images of ``count`` random RGB PNGs 0.png... of size x size, and the
    labels.csv rows ("name,label") that label each with ``model``'s own answer (so every
    input is classified correctly).  The rows are returned, not written."""
    from PIL import Image

    from advfast.io import datasets

    folder = root / "images"
    folder.mkdir()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        pixels = (torch.rand(size, size, 3, generator=gen) * 255).byte()
        Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
        with Image.open(folder / f"{i}.png") as img:
            x = datasets.imagenet_eval_transform(size)(img.convert("RGB"))[None]
        with torch.no_grad():
            rows.append(f"{i}.png,{int(model(x).argmax())}")
    return folder, rows


def step_both(x, grad, x0, **kw):
    """perturb_step_ by the op and by the reference on copies of x: both images and stats must
    agree (NaN where NaN); returns the op's stats."""
    import torch

    from advfast import ops
    from advfast.ops import reference

    x_ref = x.clone()
    stats = ops.perturb_step_(x, grad, x0, **kw)
    ref = reference.perturb_step_(x_ref, grad, x0, **kw)
    torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(stats, ref, atol=1e-5, rtol=1e-4, equal_nan=True)
    return stats
