"""``pack_weights``: each plain nn.Conv2d runs with its weight laid out for oneDNN once per call
(engine.packing): the convolution and its input gradient against float64 truth, the packs made
once, only plain convolutions touched and every module as it was afterwards, attacks that
return what the plain model gives them, and one-line refusals."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advfast
from advfast import cli
from advfast.attacks import CarliniWagnerL2
from advfast.engine import packing
from advfast.engine.core import weights_cast_once
from advfast.engine.packing import weights_packed
from tests.fixtures import small_batch, small_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="PyTorch without oneDNN")

# (in, out, kernel, stride, padding, dilation, groups, bias, H, W): strided sizes that a window
# does not reach to the end (an output padding back), grouped and depthwise, dilated, 1x1
CONVOLUTIONS = [
    (3, 8, 3, 1, 1, 1, 1, True, 9, 9),
    (3, 8, 3, 2, 1, 1, 1, True, 10, 9),
    (4, 6, 3, 2, 0, 1, 2, False, 11, 8),
    (6, 6, 3, 1, 1, 1, 6, True, 7, 7),
    (3, 5, 3, 1, 2, 2, 1, True, 9, 10),
    (4, 7, 1, 2, 0, 1, 1, False, 9, 9),
    (2, 4, (3, 2), (3, 1), (1, 0), 1, 1, True, 10, 7),
    # one output position: a linear map of the window its taps read (single_window)
    (8, 5, 3, 1, 1, 1, 1, True, 1, 1),  # ResNet-18's last stage at 32x32 images
    (6, 5, 3, 2, 1, 1, 1, False, 2, 2),  # its strided first convolution there
    (4, 6, 3, 3, 1, 1, 1, True, 3, 3),  # a window smaller than the input
    (3, 4, (3, 2), (2, 3), (1, 0), 1, 1, True, 2, 4),
]


def _truth(conv: nn.Conv2d, x: torch.Tensor, up: torch.Tensor):
    """The float64 convolution and input gradient of eager PyTorch (no oneDNN in float64)."""
    x64 = x.double().requires_grad_(True)
    bias = None if conv.bias is None else conv.bias.double()
    y = F.conv2d(x64, conv.weight.double(), bias, conv.stride, conv.padding, conv.dilation,
                 conv.groups)
    (grad,) = torch.autograd.grad(y, x64, up.double())
    return y.detach(), grad


def _packed(conv: nn.Module, x: torch.Tensor, up: torch.Tensor):
    x = x.clone().requires_grad_(True)
    with weights_packed(conv) as count:
        y = conv(x)
        (grad,) = torch.autograd.grad(y, x, up)
    assert count == 1
    return y.detach(), grad


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("spec", CONVOLUTIONS)
def test_the_convolution_and_its_input_gradient_match_float64(spec, channels_last):
    cin, cout, k, stride, padding, dilation, groups, bias, h, w = spec
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias).requires_grad_(False)
    x = torch.randn(5, cin, h, w)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.to(
            memory_format=torch.channels_last)
    up = torch.randn(F.conv2d(x, conv.weight, None, stride, padding, dilation, groups).shape)
    if channels_last:  # the gradient arriving in the layout the next layer gives it
        up = up.to(memory_format=torch.channels_last)
    want_y, want_grad = _truth(conv, x, up)
    got_y, got_grad = _packed(conv, x, up)
    assert got_y.dtype == got_grad.dtype == torch.float32
    assert got_grad.shape == x.shape
    for got, want in ((got_y, want_y), (got_grad, want_grad)):
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


def _live_taps(conv: nn.Conv2d, size: tuple[int, int]) -> tuple[torch.Size, torch.Tensor]:
    """The output's spatial size and which kernel taps read the input, not its padding: the
    taps where the gradient of the summed output w.r.t. the weight is non-zero on an all-ones
    input (autograd's convolution, not single_window's arithmetic)."""
    weight = conv.weight.detach().double().requires_grad_(True)
    y = F.conv2d(torch.ones(1, conv.in_channels, *size, dtype=torch.float64), weight, None,
                 conv.stride, conv.padding, conv.dilation, conv.groups)
    (grad,) = torch.autograd.grad(y.sum(), weight)
    return y.shape[2:], grad[0, 0] != 0


@pytest.mark.parametrize("groups,dilation", [(1, 1), (2, 1), (1, 2)])
def test_the_window_is_where_the_one_output_position_reads(groups, dilation):
    checked = 0
    for k, stride, padding in ((1, 1, 0), (3, 1, 1), (3, 2, 1), (3, 3, 0), (2, 2, 1), (3, 1, 3),
                               (5, 4, 2), (7, 2, 3), (1, 3, 1)):
        conv = nn.Conv2d(2, 2, k, stride, padding, dilation, groups).requires_grad_(False)
        for size in itertools.product(range(1, 9), repeat=2):
            if any(n + 2 * padding < dilation * (k - 1) + 1 for n in size):
                continue  # no output at all
            out, live = _live_taps(conv, size)
            window = packing.single_window(conv, torch.Size(size))
            one = tuple(out) == (1, 1) and groups == 1 and dilation == 1 and live.any()
            assert (window is not None) == bool(one), (k, stride, padding, size)
            if window is not None:
                taps = torch.zeros_like(live)
                taps[padding:padding + window[0], padding:padding + window[1]] = True
                assert torch.equal(taps, live), (k, stride, padding, size, window)
                checked += 1
    assert checked > 0 or groups != 1 or dilation != 1


def test_a_one_position_convolution_is_a_product_of_its_window_not_a_pack(monkeypatch):
    counting = _Counting()
    monkeypatch.setattr(packing, "_mkldnn", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 4, 3, 1, 1))
    model.requires_grad_(False)
    x = torch.rand(5, 3, 2, 2)  # 1x1 after the first convolution: both are one position
    want = model(x)
    with weights_packed(model):
        got = model(x)
    assert counting.reorders == 0
    assert got.shape == want.shape == (5, 4, 1, 1)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("k,stride,padding,size", [
    (3, 2, 1, 2),  # read whole (ResNet-18's strided 3x3 at 32x32 images)
    (1, 2, 0, 2),  # one pixel of four (its 1x1 shortcut there)
    (3, 3, 1, 3),  # two rows and columns of three
])
def test_a_one_position_product_gives_the_gradient_in_the_input_layout(layout, k, stride,
                                                                       padding, size):
    # a gradient in another layout than the model's would send every layer before it down
    # oneDNN's converting paths
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, k, stride, padding).requires_grad_(False).to(memory_format=layout)
    x = torch.rand(2, 4, size, size).contiguous(memory_format=layout)
    assert packing.single_window(conv, x.shape[2:]) is not None
    up = torch.randn(2, 3, 1, 1)
    with weights_packed(conv):
        x_ = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(conv(x_), x_, up)
    assert grad.is_contiguous(memory_format=layout)
    assert not grad.is_contiguous(memory_format=({torch.channels_last, torch.contiguous_format}
                                                 - {layout}).pop())
    want = _truth(conv, x, up)[1]
    assert (grad.double() - want).abs().max() <= 1e-5 * want.abs().max()


class _Counting:
    """torch.ops.mkldnn with its weight reorders counted."""

    def __init__(self) -> None:
        self.reorders = 0

    def __getattr__(self, name: str):
        op = getattr(torch.ops.mkldnn, name)
        if not name.startswith("_reorder"):
            return op

        def counted(*args):
            self.reorders += 1
            return op(*args)
        return counted


def test_each_weight_is_laid_out_once_for_every_batch_size(monkeypatch):
    counting = _Counting()
    monkeypatch.setattr(packing, "_mkldnn", counting)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, 2))
    model.requires_grad_(False)
    with weights_packed(model):
        for batch in (6, 2, 6, 1):
            x = torch.rand(batch, 1, 9, 9, requires_grad=True)
            (grad,) = torch.autograd.grad(model(x).sum(), x)
            assert grad.shape == x.shape
    assert counting.reorders == 4  # two convolutions, a forward and a transposed layout each


def test_one_module_called_at_two_image_sizes_is_right_at_both():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).requires_grad_(False)
    with weights_packed(conv):
        for h, w in ((16, 16), (15, 13), (16, 16)):
            x = torch.randn(2, 2, h, w)
            up = torch.randn(F.conv2d(x, conv.weight, None, 2, 1).shape)
            x_ = x.clone().requires_grad_(True)
            y = conv(x_)
            (grad,) = torch.autograd.grad(y, x_, up)
            want_y, want_grad = _truth(conv, x, up)
            assert (y.double() - want_y).abs().max() <= 1e-5 * want_y.abs().max()
            assert (grad.double() - want_grad).abs().max() <= 1e-5 * want_grad.abs().max()


def test_what_the_packs_are_not_for_goes_the_plain_way():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3).requires_grad_(False)
    image = torch.rand(2, 6, 6)  # unbatched, as nn.Conv2d takes it
    with weights_packed(conv):
        assert torch.equal(conv(image), nn.Conv2d.forward(conv, image))
        with pytest.raises(RuntimeError):  # float64 against float32 weights, as plain
            conv(image.double()[None])


def test_a_second_derivative_is_refused_not_zero():
    conv = nn.Conv2d(1, 1, 3).requires_grad_(False)
    x = torch.rand(1, 1, 5, 5, requires_grad=True)
    with weights_packed(conv):
        (grad,) = torch.autograd.grad((conv(x) ** 2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):  # not a silent zero
            torch.autograd.grad(grad.sum(), x)


class _Subclass(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_only_plain_frozen_conv2d_is_packed_and_every_forward_comes_back():
    own = nn.Conv2d(1, 1, 1)
    model = nn.ModuleList([nn.Conv2d(1, 1, 3), _Subclass(1, 1, 3),
                           nn.Conv2d(1, 1, 3, padding="same"),
                           nn.Conv2d(1, 1, 3, padding_mode="reflect"), nn.Conv1d(1, 1, 3),
                           nn.Conv2d(1, 1, 3).double(), own, nn.Conv2d(1, 1, 3)])
    model.requires_grad_(False)
    model[-1].weight.requires_grad_(True)  # a weight being trained is left alone
    # a module with a forward of its own keeps it

    def mine(x):
        return x
    own.forward = mine
    with pytest.raises(RuntimeError, match="inside"):
        with weights_packed(model) as count:
            replaced = [i for i, m in enumerate(model) if isinstance(m.forward, packing._Pack)]
            raise RuntimeError("inside")
    assert count == 1 and replaced == [0]
    assert own.forward is mine
    assert all("forward" not in m.__dict__ for m in model if m is not own)


def test_an_attack_returns_what_the_plain_model_gives_it(monkeypatch):
    counting = _Counting()
    monkeypatch.setattr(packing, "_mkldnn", counting)
    model = small_model()
    x, target, source = small_batch(model, n=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for make in (lambda **kw: advfast.Attack(model, loss="ce", beta=0.5, iterations=6, **kw),
                 lambda **kw: advfast.Attack(model, loss="ce", beta=0.5, iterations=30,
                                             stop="flip", **kw),
                 lambda **kw: CarliniWagnerL2(model, c=1.0, steps=20, binary_search_steps=2,
                                              **kw)):
        plain, packed = make()(x, target, source), make(pack_weights=True)(x, target, source)
        assert (packed.adversarial - plain.adversarial).abs().max() <= 1e-5
        assert torch.equal(packed.first_flip, plain.first_flip)
        assert torch.equal(packed.steps, plain.steps)
    assert counting.reorders == 3 * 2  # one convolution's two layouts, once per call
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_stream_packs_too(monkeypatch):
    counting = _Counting()
    monkeypatch.setattr(packing, "_mkldnn", counting)
    model = small_model()
    x, target, source = small_batch(model, n=5)
    attack = advfast.Attack(model, loss="ce", beta=0.5, iterations=10, stop="flip",
                            pack_weights=True)
    results = []
    for pack in (True, False):
        attack.pack_weights = pack
        given = [(x, target, source, torch.arange(5))]
        groups = list(attack.stream(lambda k: given.pop() if given else None, capacity=3))
        order = torch.argsort(torch.cat([g.key for g in groups]))
        results.append((torch.cat([g.adversarial for g in groups])[order],
                        torch.cat([g.steps for g in groups])[order]))
    assert counting.reorders == 2  # the packed stream's, once for all its batches
    assert (results[0][0] - results[1][0]).abs().max() <= 1e-5
    assert torch.equal(results[0][1], results[1][1])


def _bf16_call(model, x):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    (grad,) = torch.autograd.grad(y.float().sum(), x)
    return y.detach(), grad


def _two_convolutions(monkeypatch):
    """Reorders counted, and a frozen model of two convolutions (the second on the first's
    output) with an input for it."""
    counting = _Counting()
    monkeypatch.setattr(packing, "_mkldnn", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, 2))
    return counting, model.requires_grad_(False), torch.rand(4, 3, 9, 9)


BF16_PACKS = pytest.mark.skipif(not packing.bf16_packs_supported(),
                                reason="oneDNN has no bf16 convolutions on this CPU")


@BF16_PACKS
@pytest.mark.parametrize("cast_once", [False, True])
def test_under_bf16_the_packs_compute_as_autocast(cast_once, monkeypatch):
    counting, model, x = _two_convolutions(monkeypatch)
    want = _bf16_call(model, x)
    with weights_cast_once(model, "bf16" if cast_once else None), weights_packed(model):
        got = _bf16_call(model, x)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert counting.reorders == 4  # both packed, the second on the first one's bf16 output
    for g, w in zip(got, want):  # the same bf16 maths (kernels may round differently)
        assert (g.float() - w.float()).abs().max() <= 1e-2 * w.float().abs().max()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_without_onednn_bf16_a_bf16_convolution_runs_the_plain_way(monkeypatch):
    # (an AVX2-only CPU: oneDNN's bf16 reorder refuses there, so nothing may ask for it)
    monkeypatch.setattr(packing, "bf16_packs_supported", lambda: False)
    counting, model, x = _two_convolutions(monkeypatch)
    want = _bf16_call(model, x)
    with weights_packed(model):
        got = _bf16_call(model, x)
    assert counting.reorders == 0
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(ValueError, match="bf16 convolutions"):
        advfast.Attack(small_model(), beta=0.1, pack_weights=True, amp="bf16")
    advfast.Attack(small_model(), beta=0.1, pack_weights=True)  # float32 packs stay


def test_a_call_outside_autocast_after_one_inside_stays_float32():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).requires_grad_(False)
    x = torch.rand(2, 3, 6, 6)
    with weights_packed(conv):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(x).dtype == torch.bfloat16
        y = conv(x)
    truth = _truth(conv, x, torch.ones(2, 4, 4, 4))[0]
    assert y.dtype == torch.float32 and (y.double() - truth).abs().max() <= 1e-5 * truth.abs().max()


@pytest.mark.parametrize("kw,message", [
    (dict(compile="aot_eager"), "eager calls"),
    (dict(amp="fp16"), "float32 or bf16"),
])
def test_refused_where_it_cannot_apply(kw, message):
    with pytest.raises(ValueError, match=message):
        advfast.Attack(small_model(), beta=0.1, pack_weights=True, **kw)


def test_refused_off_the_cpu():
    with pytest.raises(ValueError, match="on the CPU"):
        advfast.Attack(small_model().to("meta"), beta=0.1, pack_weights=True)


def test_the_command_line_passes_it_on(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--iterations", "2", "--repeats", "1", "--batch-size", "4",
                     "--pack-weights", "--peers", "none", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["pack_weights"] is True
    assert "floor, fp32 eager" in report["results"][0]["configs"]
    assert cli.main(["attack", "--model", "digits", "--n", "3", "--iterations", "5",
                     "--pack-weights", "--out", str(tmp_path / "a"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["config"]["pack_weights"] is True and summary["n"] == 3
