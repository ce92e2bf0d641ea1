"""``advfast detect``: adversarial retraining as a detector (Section V-C, Tables II and III).

Binary classifiers learn to tell adversarial examples (label 1) from the genuine images they
came from (label 0):

* Table II: one detector per (attack, architecture), trained on one attack's examples;
* Table III: one detector per architecture, trained on all attacks' examples pooled, with the
  genuine images weighted so that genuine and adversarial count equally.

Inputs are ``advfast generate`` output folders, one per attack (or generated on the fly for the
paper's four losses), and the genuine images of the same inputs.  **No leakage**: the
train / validation / test split is made by input index (a fixed hash of the seed and the
index), so an adversarial example and its genuine image are always on the same side.

Training follows the paper: Adam with a learning rate from {1e-5, 1e-4, 1e-3} (each is trained;
the best on the validation split is kept), weight decay 1e-4, the best epoch on the validation
split.  Runs are seeded and deterministic, checkpointed after every epoch, and a killed run
continues with ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from advfast.io import models, selection
from advfast.io.files import write_durably, write_json
from advfast.io.reader import AdversarialDataset
from advfast.errors import FolderRefused, InvalidType, InvalidValue

LADDER = ("cnn-s", "cnn-m", "cnn-l")
PAPER_DETECTORS = ("alexnet", "resnet18", "vgg16", "resnet34", "resnet152")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DetectConfig:
    """Everything ``advfast detect`` needs; see ``advfast detect --help``."""

    out: str
    sources: dict[str, str] = field(default_factory=dict)  # attack name -> generate folder
    detectors: tuple[str, ...] = ()
    weights: str | None = None
    lrs: tuple[float, ...] = (1e-5, 1e-4, 1e-3)
    epochs: int = 20
    batch_size: int = 64
    weight_decay: float = 1e-4
    fractions: tuple[float, float] = (0.6, 0.2)  # train, validation; the rest is test
    seed: int = 0
    seeds: int = 1  # detectors trained with seeds seed .. seed + seeds - 1
    lattice: bool = True  # also the lattice control (adversarial examples rounded)
    device: str = "cpu"
    quiet: bool = False


def check_detector(name: str, channels: int) -> None:
    """ValueError for a detector that does not exist or cannot read these images."""
    if name in LADDER:
        return
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise InvalidValue(f"unknown detector {name!r}; choose from {', '.join(LADDER)} or a "
                         "torchvision classifier such as " + ", ".join(PAPER_DETECTORS))
    if channels != 3:
        raise InvalidValue(f"torchvision detectors take 3-channel images; these have {channels} "
                         "(use the ladder: cnn-s, cnn-m, cnn-l)")


def detector(name: str, channels: int, weights: str | None = None) -> nn.Module:
    """A 2-class detector: one of the digits ladder (small CNNs of increasing capacity) or a
    torchvision architecture with its last layer replaced by a 2-class head (inputs in [0, 1],
    ImageNet normalisation inside)."""
    if name in LADDER:
        widths = {"cnn-s": (8,), "cnn-m": (16, 32), "cnn-l": (32, 64, 128)}[name]
        layers, previous = [], channels
        for width in widths:
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU()]
            previous = width
        hidden = 4 * previous
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                             nn.Linear(16 * previous, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    check_detector(name, channels)
    net = models.load(name, weights=weights).model
    head_owner, attr = (net, "fc") if hasattr(net, "fc") else (net.classifier,
                                                             str(len(net.classifier) - 1))
    old = getattr(head_owner, attr)
    setattr(head_owner, attr, nn.Linear(old.in_features, 2))
    return models.Normalized(net, models.IMAGENET_MEAN, models.IMAGENET_STD)


def split_of(index: int, seed: int, fractions: tuple[float, float]) -> str:
    """train / val / test for input ``index``: a fixed hash, the same for every image of it."""
    u = selection.mix64(seed + 7919, index) / 2**64
    return "train" if u < fractions[0] else "val" if u < sum(fractions) else "test"


@dataclass
class Examples:
    """Images [n, C, H, W], labels [n] (1: adversarial), their input indices, the attack of
    each ("genuine" for genuine images) and a loss weight per image."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    attack: list[str]
    weight: torch.Tensor

    def select(self, mask: torch.Tensor) -> Examples:
        keep = mask.nonzero()[:, 0]
        return Examples(self.images[keep], self.labels[keep], self.index[keep],
                        [self.attack[i] for i in keep.tolist()], self.weight[keep])


def origin_of(folder: str) -> dict:
    """Where a generate folder's inputs came from (model, data, labels_csv, image_size, split),
    from its config.json."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            arguments = json.load(f)["arguments"]
        if not isinstance(arguments, dict):
            raise InvalidType("arguments")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InvalidValue(f"{folder}/config.json is not advfast generate's "
                           f"({type(err).__name__}: {err})") from err
    return {k: arguments.get(k) for k in ("model", "data", "labels_csv", "image_size", "split")}


def load_sources(sources: dict[str, str]) -> tuple[dict[str, dict[int, torch.Tensor]],
                                                    dict[int, torch.Tensor]]:
    """The flipped adversarial examples of every attack {attack: {index: image}} and the
    genuine images {index: image} of the same inputs (read from the source their generate run
    used, which must be the same for all)."""
    adversarial, origin = {}, None
    for name, folder in sources.items():
        dataset = AdversarialDataset(folder)
        where = origin_of(folder)
        if origin is None:
            origin = where
        elif where != origin:
            raise InvalidValue(f"{folder} was made from other inputs ({where}) than "
                             f"{next(iter(sources.values()))} ({origin}); detectors need "
                             "adversarial examples of the same genuine images")
        adversarial[name] = {row["index"]: dataset[i]["adversarial"]
                             for i, row in enumerate(dataset.rows) if row["flipped"]}
    builtin = origin["model"] if origin["model"] in models.BUILTIN else "digits"
    source = selection.open_source(origin["data"], split=origin["split"] or "test",
                                labels_csv=origin["labels_csv"],
                                image_size=origin["image_size"] or 224,
                                channels=1 if origin["model"] in models.BUILTIN else 3,
                                builtin=builtin)
    wanted = sorted({i for per in adversarial.values() for i in per})
    genuine = {}
    for batch in selection.load(source, [source.position(i) for i in wanted], 256):
        for sample in batch:
            if sample.image is not None:
                genuine[sample.index] = sample.image
    return adversarial, genuine


def lattice_levels(origin: dict) -> int:
    """The genuine images' values are k / levels: 16 for scikit-learn's digits (the built-in
    inputs of the digits model), 255 for 8-bit images (MNIST, image files)."""
    return 16 if origin["data"] is None and origin["model"] == "digits" else 255


def on_lattice(images: torch.Tensor, levels: int) -> torch.Tensor:
    """``images`` rounded to the nearest k / levels (computed as the genuine images are, so the
    values are the genuine images' exactly)."""
    return torch.round(images * levels) / levels


def lattice_examples(adversarial: dict[str, dict[int, torch.Tensor]],
                     levels: int) -> dict[str, dict[int, torch.Tensor]]:
    """Every adversarial example rounded to the lattice (:func:`on_lattice`)."""
    return {a: {i: on_lattice(x, levels) for i, x in per.items()}
            for a, per in adversarial.items()}


def wilson(p: float, n: int, z: float = 1.959963984540054) -> list[float]:
    """The Wilson score interval [lo, hi] (95 % by default) of a proportion p over n trials
    ([0, 1] when n is 0)."""
    if n <= 0:
        return [0.0, 1.0]
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * (p * (1 - p) / n + z2n / (4 * n)) ** 0.5
    # the ends at p = 0 and 1 are exactly 0 and 1 (the closed form rounds to 1e-17 off)
    return [0.0 if p <= 0 else max(0.0, centre - half), 1.0 if p >= 1 else min(1.0, centre + half)]


def sizes_of(test: Examples) -> dict[str, int]:
    """The number of test images behind each accuracy of :func:`evaluate`."""
    sizes = {name: test.attack.count(name) for name in set(test.attack)}
    sizes["adversarial"] = int((test.labels == 1).sum())
    return sizes


def intervals(values: dict[str, float], sizes: dict[str, int]) -> dict[str, list[float]]:
    """The 95 % Wilson interval of each accuracy over the test split; for ``balanced`` (the mean
    of the genuine and adversarial accuracies) the mean of their two intervals, which is wider
    than the interval of a mean of two independent estimates."""
    out = {k: wilson(v, sizes[k]) for k, v in values.items() if k != "balanced"}
    if "balanced" in values:
        out["balanced"] = [(a + b) / 2 for a, b in zip(out["genuine"], out["adversarial"])]
    return out


def examples(adversarial: dict[str, dict[int, torch.Tensor]], genuine: dict[int, torch.Tensor],
             attacks: list[str]) -> Examples:
    """Genuine and adversarial images of the inputs every listed attack turned; the genuine
    ones weighted by the number of attacks, so that both classes weigh the same."""
    indices = sorted(set.intersection(*(set(adversarial[a]) for a in attacks)) & set(genuine))
    images, labels, index, attack, weight = [], [], [], [], []
    for i in indices:
        images.append(genuine[i])
        labels.append(0), index.append(i), attack.append("genuine")
        weight.append(float(len(attacks)))
        for a in attacks:
            images.append(adversarial[a][i])
            labels.append(1), index.append(i), attack.append(a)
            weight.append(1.0)
    if not images:
        raise InvalidValue(f"no input has a successful adversarial example of {', '.join(attacks)}")
    return Examples(torch.stack(images).float(), torch.tensor(labels), torch.tensor(index),
                    attack, torch.tensor(weight))


def split_sets(pool: Examples, seed: int, fractions: tuple[float, float]) -> dict[str, Examples]:
    """The pool cut into train / val / test by input index (:func:`split_of`); ValueError when
    a split is empty (too few inputs)."""
    split = [split_of(int(i), seed, fractions) for i in pool.index]
    sets = {s: pool.select(torch.tensor([p == s for p in split])) for s in SPLITS}
    empty = [s for s, e in sets.items() if len(e.labels) == 0]
    if empty:
        raise InvalidValue(f"the {' and '.join(empty)} split has no input ({len(set(pool.index.tolist()))} "
                         "inputs in all); attack more inputs (--n)")
    return sets


def train_detector(name: str, lr: float, sets: dict[str, Examples], config: DetectConfig,
                   checkpoint: str, progress) -> tuple[nn.Module, float, list[dict]]:
    """Adam (lr, weight decay) on the weighted cross-entropy, one checkpoint per epoch; returns
    the weights of the epoch best on the validation split, its accuracy, the history and the
    epoch it resumed at (0: a fresh start).  Continues from ``checkpoint`` when it exists."""
    device = torch.device(config.device)
    train, val = sets["train"], sets["val"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = detector(name, train.images.shape[1], config.weights).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    state = {"epoch": 0, "best_val": -1.0, "best": None, "history": [], "resumed_at": 0}
    if os.path.exists(checkpoint):
        state = read_checkpoint(checkpoint, device)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        state["resumed_at"] = state["epoch"]
    for epoch in range(state["epoch"], config.epochs):
        # every epoch's randomness (order, dropout) from its own seed: a resumed run repeats it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed * 1000 + epoch)
            train_epoch(model, optimiser, train, config.batch_size, device)
        accuracy = evaluate(model, val, config.batch_size, device)["balanced"]
        state["history"].append({"epoch": epoch + 1, "val_balanced_accuracy": accuracy})
        if accuracy > state["best_val"]:
            state["best_val"] = accuracy
            state["best"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state.update(epoch=epoch + 1, model=model.state_dict(), optimizer=optimiser.state_dict())
        write_durably(checkpoint, lambda tmp: torch.save(state, tmp))
        progress()
    model.load_state_dict(state["best"])
    return model, state["best_val"], state["history"], state["resumed_at"]


def read_checkpoint(path: str, device: torch.device) -> dict:
    """A detector checkpoint, read without unpickling code (``weights_only=True``: tensors,
    numbers, strings, lists and dicts only), so a planted file cannot run anything; a damaged
    or foreign one is refused with one line."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or not {"epoch", "model", "optimizer"} <= set(state):
            raise TypeError("not a detector checkpoint")
    except Exception as err:  # torch raises UnpicklingError, EOFError, RuntimeError, ...
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise FolderRefused(f"checkpoint {path} cannot be read safely ({type(err).__name__}: "
                            f"{reason}); remove it to train that detector afresh") from err
    return state


def train_epoch(model: nn.Module, optimiser: torch.optim.Optimizer, train: Examples,
                batch_size: int, device: torch.device) -> None:
    """One pass over the training set in a random order, on the weighted cross-entropy."""
    order = torch.randperm(len(train.labels))
    model.train()
    for start in range(0, len(order), batch_size):
        pick = order[start:start + batch_size]
        logits = model(train.images[pick].to(device))
        losses = nn.functional.cross_entropy(logits, train.labels[pick].to(device),
                                             reduction="none")
        w = train.weight[pick].to(device)
        loss = (losses * w).sum() / w.sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def evaluate(model: nn.Module, examples: Examples, batch_size: int,
             device: torch.device) -> dict[str, float]:
    """Accuracy on genuine images, on each attack's examples, on all adversarial examples, and
    balanced (the mean of genuine and adversarial accuracy)."""
    model.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(examples.labels), batch_size):
            preds.append(model(examples.images[start:start + batch_size].to(device))
                         .argmax(1).cpu())
    correct = torch.cat(preds) == examples.labels
    out = {}
    for name in sorted(set(examples.attack)):
        mask = torch.tensor([a == name for a in examples.attack])
        out[name] = float(correct[mask].float().mean())
    adversarial = examples.labels == 1
    out["adversarial"] = float(correct[adversarial].float().mean())
    out["balanced"] = (out["genuine"] + out["adversarial"]) / 2
    return out


def run(config: DetectConfig, progress_bar=None) -> dict:
    """Tables II and III: trains every (attack or pool, detector, seed, lr) and evaluates the
    one best on validation on the test split; then, unless ``config.lattice`` is off, the same
    on the adversarial examples rounded to the genuine images' lattice (under ``lattice``).
    Runs already finished (a file in runs/) are read back; an unfinished one continues from its
    checkpoint."""
    adversarial, genuine = load_sources(config.sources)
    os.makedirs(os.path.join(config.out, "checkpoints"), exist_ok=True)
    os.makedirs(os.path.join(config.out, "runs"), exist_ok=True)
    jobs = len(config.sources) + 1
    total = jobs * len(config.detectors) * len(config.lrs) * config.seeds * config.epochs
    bar = progress_bar(total * (2 if config.lattice else 1)) if progress_bar else None
    tick = (lambda n=1: bar.update(n)) if bar else (lambda n=1: None)
    results = tables(config, adversarial, genuine, "", tick)
    if config.lattice:
        levels = lattice_levels(origin_of(next(iter(config.sources.values()))))
        results["lattice"] = {"levels": levels, **tables(
            config, lattice_examples(adversarial, levels), genuine, "lattice-", tick)}
    if bar:
        bar.close()
    return results


def tables(config: DetectConfig, adversarial: dict[str, dict[int, torch.Tensor]],
           genuine: dict[int, torch.Tensor], prefix: str, tick) -> dict:
    """The rows of Tables II and III for these adversarial examples; run files named with
    ``prefix``."""
    attacks = list(config.sources)
    jobs = [("table2", [a]) for a in attacks] + [("table3", attacks)]
    results = {"table2": [], "table3": []}
    for table, group in jobs:
        sets = split_sets(examples(adversarial, genuine, group), config.seed, config.fractions)
        for name in config.detectors:
            per_seed = [best_run(config, f"{prefix}{table}-{'+'.join(group)}-{name}", name, seed,
                                 sets, tick)
                        for seed in range(config.seed, config.seed + config.seeds)]
            results[table].append(table_row(group, name, per_seed, sets))
    return results


def best_run(config: DetectConfig, stem: str, name: str, seed: int, sets: dict[str, Examples],
             tick) -> dict:
    """The run (over the learning rates) best on validation, of the detector trained with
    ``seed``; each run read back from runs/ when it finished before."""
    best = None
    seeded = dataclasses.replace(config, seed=seed)
    for lr in config.lrs:
        run_name = f"{stem}-lr{lr:g}" + ("" if seed == config.seed else f"-seed{seed}")
        done = os.path.join(config.out, "runs", run_name + ".json")
        if os.path.exists(done):
            with open(done) as f:
                result = json.load(f)
            tick(config.epochs)
        else:
            model, val, history, resumed_at = train_detector(
                name, lr, sets, seeded, os.path.join(config.out, "checkpoints", run_name + ".pt"),
                tick)
            result = {"lr": lr, "val_balanced_accuracy": val, "history": history,
                      "resumed_at_epoch": resumed_at,
                      "test": evaluate(model, sets["test"], config.batch_size,
                                       torch.device(config.device))}
            write_json(done, result)
        if best is None or result["val_balanced_accuracy"] > best["val_balanced_accuracy"]:
            best = result
    return {"seed": seed, **best}


def table_row(group: list[str], name: str, per_seed: list[dict],
              sets: dict[str, Examples]) -> dict:
    """One row: the test accuracies (the mean over seeds) with their 95 % Wilson intervals
    (``<accuracy>_ci95``), the learning rate of the first seed, and the per-seed values."""
    sizes = sizes_of(sets["test"])
    keys = list(per_seed[0]["test"])
    mean = {k: sum(r["test"][k] for r in per_seed) / len(per_seed) for k in keys}
    seeds = [{"seed": r["seed"], "lr": r["lr"], "val_balanced_accuracy": r["val_balanced_accuracy"],
              **r["test"], **{f"{k}_ci95": v for k, v in intervals(r["test"], sizes).items()}}
             for r in per_seed]
    return {"attacks": group, "detector": name, "lr": per_seed[0]["lr"],
            "val_balanced_accuracy": sum(r["val_balanced_accuracy"] for r in per_seed)
            / len(per_seed),
            "inputs_per_split": {s: int((sets[s].labels == 0).sum()) for s in SPLITS},
            "test_sizes": sizes, **mean,
            **{f"{k}_ci95": v for k, v in intervals(mean, sizes).items()},
            "seeds": [r["seed"] for r in per_seed], "per_seed": seeds}


FILES = ("table2.json", "table2.csv", "table3.json", "table3.csv", "detect.png")


def write(results: dict, out) -> None:
    """table2.{json,csv}, table3.{json,csv} and detect.png into ``out``; the lattice control
    (when run) under ``lattice`` in the JSON files and as rows with control = lattice in the
    CSV files."""
    for table in ("table2", "table3"):
        document = {"rows": results[table]}
        rows = [csv_row(r, "original") for r in results[table]]
        if "lattice" in results:
            lattice = results["lattice"]
            document["lattice"] = {"levels": lattice["levels"], "rows": lattice[table]}
            rows += [csv_row(r, "lattice") for r in lattice[table]]
        write_json(out.file(f"{table}.json"), document)
        write_durably(out.file(f"{table}.csv"), lambda tmp, rows=rows: write_csv(tmp, rows))
    write_durably(out.file("detect.png"), lambda tmp: figure(results, tmp))


def csv_row(row: dict, control: str) -> dict:
    """A row of the CSV files: intervals as ``<accuracy>_ci95_lo`` / ``_hi`` columns, the
    per-seed values as JSON."""
    out = {"control": control, "attacks": "+".join(row["attacks"])}
    for k, v in row.items():
        if k in ("attacks", "inputs_per_split", "test_sizes"):
            continue
        if k.endswith("_ci95"):
            out[f"{k}_lo"], out[f"{k}_hi"] = v
        elif k in ("per_seed", "seeds"):
            out[k] = json.dumps(v)
        else:
            out[k] = v
    return out


def write_csv(path: str, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        fields = sorted({k for r in rows for k in r}, key=lambda k: (
            k not in ("control", "attacks", "detector", "lr"), k))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _pct(row: dict, key: str) -> str:
    """An accuracy in % with the half-width of its 95 % interval."""
    lo, hi = row[f"{key}_ci95"] if f"{key}_ci95" in row else (row[key], row[key])
    return f"{100 * row[key]:.0f}%\u00b1{100 * (hi - lo) / 2:.0f}"


def format_tables(results: dict) -> str:
    """Tables II and III printed as the paper prints them (accuracy in %, +- the half-width of
    the 95 % Wilson interval over the test split), then the lattice control when run."""
    lines = _format_pair(results, "")
    if "lattice" in results:
        levels = results["lattice"]["levels"]
        lines += ["", f"LATTICE CONTROL: adversarial examples rounded to k/{levels}, as the "
                      "genuine images are", *_format_pair(results["lattice"], " (lattice)")]
    seeds = results["table2"][0].get("seeds", [0]) if results["table2"] else [0]
    if len(seeds) > 1:
        lines.append(f"Each value: the mean over {len(seeds)} training seeds ({seeds[0]}.."
                     f"{seeds[-1]}); per-seed values in table2.json and table3.json.")
    return "\n".join(lines)


def _format_pair(results: dict, suffix: str) -> list[str]:
    detectors = list(dict.fromkeys(r["detector"] for r in results["table2"]))
    attacks = list(dict.fromkeys(r["attacks"][0] for r in results["table2"]))
    width = 34
    lines = [f"TABLE II{suffix}: genuine / adversarial (overall) accuracy, one attack per "
             "detector", f"{'Attack':10}" + "".join(f"{d:>{width}}" for d in detectors)]
    for a in attacks:
        cells = []
        for d in detectors:
            r = next(r for r in results["table2"] if r["attacks"] == [a] and r["detector"] == d)
            cells.append(f"{_pct(r, 'genuine')} {_pct(r, 'adversarial')} "
                         f"({_pct(r, 'balanced')})")
        lines.append(f"{a:10}" + "".join(f"{c:>{width}}" for c in cells))
    lines += ["", f"TABLE III{suffix}: accuracy when the {len(attacks)} attacks are pooled",
              f"{'':22}" + "".join(f"{d:>12}" for d in detectors)]
    pooled = {r["detector"]: r for r in results["table3"]}
    for key, label in [*[(a, a) for a in attacks], ("adversarial", "Adversarial Examples"),
                       ("genuine", "Genuine Images"), ("balanced", "Overall Accuracy")]:
        lines.append(f"{label:22}" + "".join(f"{_pct(pooled[d], key):>12}" for d in detectors))
    lines.append("Overall: the mean of genuine and adversarial accuracy (classes weigh the "
                 "same); test split by input index; \u00b1: half the 95 % Wilson interval.")
    return lines


def figure(results: dict, path: str) -> None:
    """Accuracy per attack and detector (Table II) and the pooled breakdown (Table III)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detectors = list(dict.fromkeys(r["detector"] for r in results["table2"]))
    attacks = list(dict.fromkeys(r["attacks"][0] for r in results["table2"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    width = 0.8 / len(detectors)
    for k, d in enumerate(detectors):
        values = [next(r["balanced"] for r in results["table2"]
                       if r["attacks"] == [a] and r["detector"] == d) for a in attacks]
        axes[0].bar([i + k * width for i in range(len(attacks))], values, width, label=d)
        pooled = next(r for r in results["table3"] if r["detector"] == d)
        keys = [*attacks, "adversarial", "genuine", "balanced"]
        axes[1].bar([i + k * width for i in range(len(keys))], [pooled[x] for x in keys], width,
                    label=d)
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(attacks))], attacks)
    axes[0].set(ylim=(0, 1), ylabel="overall accuracy", title="Table II: one attack per detector")
    keys = [*attacks, "all adv.", "genuine", "overall"]
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
    axes[1].set(ylim=(0, 1), title=f"Table III: {len(attacks)} attacks pooled")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


__all__ = ["DetectConfig", "run", "write", "format_tables", "detector", "split_of", "wilson",
           "lattice_levels", "on_lattice", "LADDER",
           "PAPER_DETECTORS"]
