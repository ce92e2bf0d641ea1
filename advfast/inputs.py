"""Choosing what to attack: a model plus its correctly classified inputs and seeded targets,
shared by the ``table1`` and ``attack`` commands."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import data


@dataclass
class AttackInputs:
    """Correctly classified images [N, C, H, W] in [0, 1], their labels, input indices (in the
    source's order), paths (or "" for digits), and a random target per image."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    paths: list[str]
    targets: torch.Tensor
    num_classes: int


# Step sizes: the paper's values for ImageNet-sized inputs, and ones chosen for the 1x8x8
# digits default so that (nearly) every first flip falls inside 250 iterations.
PAPER_ALPHA, PAPER_BETA = 5e-4, 5.0
DIGITS_ALPHA, DIGITS_BETA = 2e-3, 0.1


def step_sizes(args) -> tuple[float, float]:
    """(alpha, beta) from --alpha/--beta, else the defaults for the digits or for images."""
    digits = args.model == "digits" and args.data is None
    alpha = args.alpha if args.alpha is not None else (DIGITS_ALPHA if digits else PAPER_ALPHA)
    beta = args.beta if args.beta is not None else (DIGITS_BETA if digits else PAPER_BETA)
    return alpha, beta


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is visible")
    return resolved


def prepare(model: torch.nn.Module, model_name: str, data_dir: str | None, n: int | None,
            seed: int, device: torch.device, labels_csv: str | None = None,
            image_size: int = 224, batch_size: int = 64, workers: int = 0) -> AttackInputs:
    """The first ``n`` correctly classified inputs and their seeded random targets."""
    if data_dir is None:
        if model_name != "digits":
            raise ValueError("--data DIR is required for models other than the digits default")
        images, labels = data.digits("test")
        x, y, idx = data.correctly_classified(model, images, labels, n=n, batch_size=batch_size,
                                              device=device)
        paths = [""] * len(idx)
    else:
        files = data.ImageFiles(data_dir, labels_csv,
                                data.imagenet_eval_transform(image_size))
        x, y, idx = data.correctly_classified(model, files, n=n, batch_size=batch_size,
                                              device=device, num_workers=workers)
        paths = [files.items[i][0] for i in idx.tolist()]
    with torch.no_grad():
        num_classes = model(x[:1].to(device)).shape[1]
    return AttackInputs(x, y, idx, paths, data.random_targets(y, num_classes, seed), num_classes)

