"""``advfast bench``: how fast is an attack iteration on this model and device, how close to the
floor, and how does it compare with the libraries people use now.

In one process and round-robin (so drift hits every configuration alike), after an untimed
warm-up of each, it times per iteration:

* the **floor**: a bare forward + backward w.r.t. the input (same model, precision, layout);
* **advfast**'s iteration, recording the trajectory on and off, eager and under each requested
  torch.compile mode;
* each installed **peer**'s equivalent attack: torchattacks' BIM / CW, Foolbox's
  LinfBasicIterativeAttack / L2CarliniWagnerAttack, ART's BasicIterativeMethod (skipped with a
  note where not installed).

Times are CUDA events on GPUs (perf_counter on the CPU); each cell is the median of
``repeats`` runs of ``iterations`` iterations, with the spread (min to max).
"""

from __future__ import annotations

import contextlib
import copy
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from advfast import __version__, ops
from advfast.engine.core import AMPS, frozen
from advfast.engine.timing import hardware_info
from advfast.io import models
from advfast.tools import specs
from advfast.errors import InvalidValue

FP32_FLOOR = "floor, fp32 eager"
PEERS = ("torchattacks", "foolbox", "art")


@dataclass(frozen=True)
class BenchConfig:
    """What ``advfast bench`` measures; see ``advfast bench --help``."""

    model: str = "digits"
    weights: str | None = None
    num_classes: int | None = None
    input_size: tuple[int, int, int] | None = None
    batch_sizes: tuple[int, ...] = (64,)
    amp: str | None = None
    channels_last: bool = False
    pack_weights: bool = False
    compile: tuple[str, ...] = ("none",)
    attack: str = "eq11"
    params: dict = field(default_factory=dict)
    iterations: int = 20
    repeats: int = 5
    peers: tuple[str, ...] = PEERS
    device: torch.device = torch.device("cpu")


@dataclass
class Measured:
    """One configuration: per-iteration milliseconds of each repeat."""

    name: str
    samples: list[float] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)
    loop: list[float] = field(default_factory=list)  # advfast: ms per iteration inside the loop
    iterations: list[int] = field(default_factory=list)  # advfast: iterations its loop ran

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def floor(model, x, iterations: int, amp: str | None) -> Callable[[], None]:
    """A bare forward + backward w.r.t. the input, ``iterations`` times."""
    cast = torch.autocast(x.device.type, dtype=AMPS[amp]) if amp else contextlib.nullcontext()
    with torch.no_grad(), cast:
        classes = model(x[:1]).shape[1]
    seed = torch.randn(len(x), classes, device=x.device)

    def run() -> None:
        with frozen(model):
            for _ in range(iterations):
                xr = x.detach().requires_grad_(True)
                with cast:
                    logits = model(xr)
                torch.autograd.grad(logits, xr, seed.to(logits.dtype))

    return run


def _timing_params(config: BenchConfig) -> dict:
    """The attack's parameters with every sample running all iterations (no stop rule, no
    early abort, one constant), so that an iteration means the same for everyone."""
    given = dict(config.params)
    if config.attack in ("eq11", "ifgs"):
        given["stop"] = "never"
    if config.attack == "cw-l2":
        given.update(binary_search_steps=1, abort_early=False)
    if config.attack == "lbfgs":
        given.update(binary_search_steps=1)
    given["iterations"] = config.iterations
    return specs.resolve(config.attack, given,
                         config.model if config.model in models.BUILTIN else None)


def ours(attack, x, target, source, record: bool, measured: Measured) -> Callable[[], None]:
    """A run of advfast's ``attack`` (recording or not; one attack object per compile mode, so
    its graphs compile once)."""

    def run() -> None:
        attack.record = record
        timing = attack(x, target, source).timing
        measured.loop.append(timing.per_iteration_ms)
        measured.iterations.append(timing.steps)
        for phase, ms in (timing.phases_ms or {}).items():
            measured.phases.setdefault(phase, []).append(ms)

    return run


def peer(name: str, model, x, target, config: BenchConfig) -> Callable[[], None] | str:
    """The peer's equivalent of the attack, or why there is none."""
    module = {"art": "art.attacks.evasion"}.get(name, name)  # ("art" is also another package)
    try:
        __import__(module)
    except ImportError:
        return f"{name} not installed"
    p = _timing_params(config)
    sign_attack = config.attack in ("eq11", "ifgs")
    eps = p.get("eps") or 8 / 255
    alpha = p.get("alpha") or 1 / 255
    steps = config.iterations
    if name == "torchattacks":
        import torchattacks

        if sign_attack:
            attack = torchattacks.BIM(model, eps=eps, alpha=alpha, steps=steps)
        elif config.attack == "cw-l2":
            attack = torchattacks.CW(model, c=p["c"], kappa=p["kappa"], steps=steps, lr=p["lr"])
        else:
            return "torchattacks has no L-BFGS"
        attack.set_mode_targeted_by_label(quiet=True)
        return lambda: attack(x, target)
    if name == "foolbox":
        import foolbox

        fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=x.device)
        criterion = foolbox.criteria.TargetedMisclassification(target)
        if sign_attack:
            attack = foolbox.attacks.LinfBasicIterativeAttack(abs_stepsize=alpha, steps=steps,
                                                              random_start=False)
            return lambda: attack(fmodel, x, criterion, epsilons=eps)
        if config.attack == "cw-l2":
            attack = foolbox.attacks.L2CarliniWagnerAttack(
                binary_search_steps=1, steps=steps, stepsize=p["lr"], confidence=p["kappa"],
                initial_const=p["c"], abort_early=False)
            return lambda: attack(fmodel, x, criterion, epsilons=None)
        return "Foolbox 3 has no L-BFGS"
    from art.attacks.evasion import BasicIterativeMethod
    from art.estimators.classification import PyTorchClassifier

    if not sign_attack:
        return f"ART's {config.attack} is not compared"
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    classifier = PyTorchClassifier(model, loss=torch.nn.CrossEntropyLoss(),
                                   input_shape=tuple(x.shape[1:]), nb_classes=classes,
                                   clip_values=(0.0, 1.0),
                                   device_type="gpu" if x.is_cuda else "cpu")
    attack = BasicIterativeMethod(classifier, eps=eps, eps_step=alpha, max_iter=steps,
                                  targeted=True, batch_size=len(x), verbose=False)
    images, labels = x.cpu().numpy(), target.cpu().numpy()
    return lambda: attack.generate(images, labels)


def run(config: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Measures every configuration for every batch size; returns the results as a dict."""
    device = config.device
    model = models.load(config.model, weights=config.weights, device=device,
                        num_classes=config.num_classes)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    size = config.input_size or ((models.input_channels(model), 8, 8) if config.model == "digits"
                                 else (models.input_channels(model), 224, 224))
    results = []
    for batch in config.batch_sizes:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(batch, *size, generator=gen).to(device)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            logits = model(x)
        source = logits.argmax(1)
        target = (source + 1 + torch.randint(0, logits.shape[1] - 1, (batch,),
                                             generator=gen).to(device)) % logits.shape[1]
        runs = _floors(model, x, config)
        for mode in config.compile:
            attack = specs.build(config.attack, model, _timing_params(config), amp=config.amp,
                                   compile=None if mode == "none" else mode,
                                   channels_last=config.channels_last,
                                   pack_weights=config.pack_weights)
            for record in (True, False):
                name = (f"advfast{'' if mode == 'none' else ' ' + mode}, "
                        f"record {'on' if record else 'off'}")
                m = Measured(name)
                runs[name] = (m, ours(attack, x, target, source, record, m))
        notes = {}
        for name in config.peers:
            made = peer(name, model, x, target, config)
            if isinstance(made, str):
                notes[name] = made
            else:
                runs[name] = (Measured(name), made)
        for name, (m, fn) in runs.items():  # warm-up, compilation included, untimed
            progress(f"batch {batch}: warming up {name}")
            fn()
            m.loop.clear(), m.phases.clear(), m.iterations.clear()
        for r in range(config.repeats):
            for name, (m, fn) in runs.items():
                progress(f"batch {batch}: repeat {r + 1}/{config.repeats}, {name}")
                seconds = _clock(device, fn)
                # a search may run to its next compaction point: divide by what really ran
                ran = m.iterations[-1] if m.iterations else config.iterations
                m.samples.append(1e3 * seconds / max(ran, 1))
        fp32 = runs.get(FP32_FLOOR, runs["floor"])[0].median
        results.append({"batch": batch, "input": list(size), "notes": notes,
                        "configs": {n: _summary(m, runs["floor"][0].median, batch, fp32)
                                    for n, (m, _) in runs.items()}})
    return {"config": {**asdict(config), "device": str(device)}, "results": results,
            "hardware": {**hardware_info(device), "cpu_model": _cpu_model(),
                         "cpu_bf16": cpu_bf16()},
            "versions": _versions()}


def _floors(model, x, config: BenchConfig) -> dict[str, tuple[Measured, Callable[[], None]]]:
    """The floor in the configuration's precision and layout and, with --amp,
    --channels-last or --pack-weights, the fp32 eager floor in contiguous format (what a user
    runs today; the floor itself never packs its weights)."""
    runs = {"floor": (Measured("floor"), floor(model, x, config.iterations, config.amp))}
    if config.amp or config.channels_last or config.pack_weights:
        plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        runs[FP32_FLOOR] = (Measured(FP32_FLOOR), floor(plain, x.contiguous(),
                                                        config.iterations, None))
    return runs


def _summary(m: Measured, floor_ms: float, batch: int, fp32_floor_ms: float) -> dict:
    """One configuration's row: against its own-precision floor and against the fp32 eager
    floor (what the user runs without --amp / --channels-last)."""
    med = m.median
    out = {"ms_per_iteration": med, "min": min(m.samples), "max": max(m.samples),
           "samples": m.samples, "ratio_to_floor": med / floor_ms,
           "ratio_to_fp32_floor": med / fp32_floor_ms,
           "image_iterations_per_s": 1e3 * batch / med}
    if m.phases:
        phases = {k: statistics.median(v) for k, v in m.phases.items()}
        out["phases_ms"] = phases
        out["own_work_percent_of_floor"] = 100 * (phases["head"] + phases["update"]) / floor_ms
        loop = statistics.median(m.loop)
        out["loop_ms_per_iteration"] = loop
        out["loop_ratio_to_floor"] = loop / floor_ms
    return out


def cpu_bf16() -> str:
    """The CPU's bfloat16 hardware, from /proc/cpuinfo's flags: "amx" (AMX tiles),
    "avx512_bf16" (AVX-512 BF16 dot products) or "none" (bf16 then runs emulated, slower)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    out = {"advfast": __version__, "torch": torch.__version__, "kernels": ops.backend(),
           "python": platform.python_version()}
    for name in PEERS + ("adversarial-robustness-toolbox",):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # not installed
            continue
    return out


def format_results(report: dict) -> str:
    """The measured table as Markdown, with the hardware and versions."""
    hw, ver = report["hardware"], report["versions"]
    where = (hw.get("gpu") or f"{report['hardware']['cpu_model']} (bf16: "
             f"{hw.get('cpu_bf16')}), {hw.get('threads')} threads")
    lines = [f"advfast bench: {report['config']['model']} on {where}; "
             + ", ".join(f"{k} {v}" for k, v in ver.items()), ""]
    lines.append("| batch | configuration | ms / iteration (min–max) | image-iterations/s | "
                 "vs floor | vs fp32 floor | in the loop: vs floor | "
                 "forward / head / backward / update ms | advfast's own work |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for result in report["results"]:
        for name, s in result["configs"].items():
            phases = s.get("phases_ms")
            shown = " / ".join(f"{phases[p]:.2f}" for p in ("forward", "head", "backward",
                                                              "update")) if phases else ""
            own = f"{s['own_work_percent_of_floor']:.1f}% of floor" if phases else ""
            loop = f"{s['loop_ratio_to_floor']:.3f}x" if phases else ""
            lines.append(f"| {result['batch']} | {name} | {s['ms_per_iteration']:.3f} "
                         f"({s['min']:.3f}–{s['max']:.3f}) | {s['image_iterations_per_s']:.0f} | "
                         f"{s['ratio_to_floor']:.3f}x | {s['ratio_to_fp32_floor']:.3f}x | "
                         f"{loop} | {shown} | {own} |")
        for name, why in result["notes"].items():
            lines.append(f"| {result['batch']} | {name} | skipped: {why} | | | | | | |")
    lines.append("")
    lines.append("ms / iteration: a whole call (set-up and, for advfast, the final forward that "
                 "observes the last images) divided by the iterations; in the loop: advfast's "
                 "own per-iteration time (timing.per_iteration_ms); own work: loss head and "
                 "update (everything but the model's forward and backward); vs fp32 floor: "
                 "against a bare fp32 eager forward + backward in contiguous format (with "
                 "--amp, --channels-last or --pack-weights, the speed-up over what runs "
                 "without them).")
    return "\n".join(lines)


def nsys_command(argv: list[str], report: str) -> list[str]:
    """The command that runs this bench again under Nsight Systems (CUDA and NVTX traces);
    ValueError when nsys is not on the PATH."""
    import shutil
    import sys

    nsys = shutil.which("nsys")
    if nsys is None:
        raise InvalidValue("--nsys needs Nsight Systems' nsys on the PATH (not found); install it "
                         "or drop --nsys")
    rest = [a for a in argv if a != "--nsys"]
    return [nsys, "profile", "-t", "cuda,nvtx", "-o", report, "--force-overwrite", "true",
            sys.executable, "-m", "advfast", *rest]


__all__ = ["BenchConfig", "run", "format_results", "nsys_command", "PEERS"]
