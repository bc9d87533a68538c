"""Layer tracking: per-example gradients rebuilt from captured tokens, module selection, hooks.

The reference gradients come from ``torch.func`` (vmap over examples of ``grad`` of one
example's loss) or from plain autograd one example at a time, laid out explicitly in the
``(d_out, d_in)`` convention (bias as the last column, Conv1D's ``(in, out)`` weight transposed),
so a wrong sign, a missing bias column, a transposed layout or a dropped token shows.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from transformers.pytorch_utils import Conv1D

from lightning_influence.capture import LayerCapture, find_tracked_layers, layer_weight_matrix
from lightning_influence.errors import TrackingError

from . import models


def expected_matrix_grad(module, g: dict) -> torch.Tensor:
    """``[B, d_out, d_in]`` from per-example parameter gradients, written out per layer type."""
    w = g["weight"]
    if isinstance(module, Conv1D):
        w = w.transpose(1, 2)  # (in, out) -> (out, in)
    w = w.reshape(w.shape[0], w.shape[1], -1)  # conv2d: (out, C, kh, kw) -> (out, C*kh*kw)
    if "bias" in g:
        w = torch.cat([w, g["bias"].unsqueeze(-1)], dim=-1)
    return w


def loss_of_output(out: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """A per-example loss, nonlinear in the output so that s differs between tokens and examples."""
    return (torch.tanh(out) * probe).sum() + 0.3 * (out ** 2).sum()


def check_layer(module: nn.Module, x: torch.Tensor, seed: int = 0):
    """Captured ``sum_t s_t a_t^T`` == per-example gradient from torch.func, in matrix layout."""
    module = module.double()
    wrapper = nn.Sequential(module)
    layers = find_tracked_layers(wrapper)
    assert list(layers) == ["0"]
    layer = layers["0"]
    with torch.no_grad():
        out_shape = module(x[:1]).shape[1:]
    probe = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    with LayerCapture(wrapper, layers, dtype=torch.float64) as cap:
        out = wrapper(x)
        acts, grads = cap.collect(loss_of_output(out, probe))
    a, s = acts["0"], grads["0"]
    assert a.shape[-1] == layer.d_in and s.shape[-1] == layer.d_out
    ours = torch.einsum("bto,bti->boi", s, a)

    params = {k: v.detach() for k, v in module.named_parameters()}

    def one(p, xi):
        return loss_of_output(functional_call(module, p, (xi.unsqueeze(0),))[0], probe)

    g = vmap(grad(one), in_dims=(None, 0))(params, x)
    expected = expected_matrix_grad(module, g)
    assert expected.shape[1:] == layer.shape
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)

    # layer_weight_matrix uses the same layout as the captured tokens: out_t = W a_t (bias included).
    w = layer_weight_matrix(module, layer)
    assert w.shape == layer.shape
    out_tokens = torch.einsum("oi,bti->bto", w, a)
    if isinstance(module, nn.Conv2d):
        ref = out.flatten(2).transpose(1, 2)
    else:
        ref = out.reshape(out.shape[0], -1, out.shape[-1])
    torch.testing.assert_close(out_tokens, ref, rtol=1e-10, atol=1e-12)
    return a, s


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 5), (3, 2, 3, 5)], ids=["B_d", "B_T_d", "B_T1_T2_d"])
def test_linear_per_example_gradient(bias, shape):
    torch.manual_seed(0)
    a, s = check_layer(nn.Linear(5, 6, bias=bias), randn(*shape))
    tokens = 1
    for d in shape[1:-1]:
        tokens *= d
    assert a.shape == (shape[0], tokens, 5 + bias)
    if bias:
        assert torch.equal(a[..., -1], torch.ones_like(a[..., -1]))


@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 5), (3, 2, 3, 5)], ids=["B_d", "B_T_d", "B_T1_T2_d"])
def test_conv1d_per_example_gradient(shape):
    torch.manual_seed(0)
    module = Conv1D(6, 5)  # nf=6 outputs, nx=5 inputs; weight stored (5, 6); Conv1D always has a bias
    with torch.no_grad():
        module.bias.normal_()  # zero-initialised otherwise
    assert module.weight.shape == (5, 6)
    a, _ = check_layer(module, randn(*shape))
    assert a.shape[-1] == 6


CONVS = {
    "stride2_pad1": dict(kernel_size=3, stride=2, padding=1),
    "stride_2x1_pad_tuple": dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2)),
    "same_dilation2": dict(kernel_size=3, padding="same", dilation=2),
    "same_even_kernel": dict(kernel_size=(2, 4), padding="same"),
    "valid_dilation": dict(kernel_size=2, padding="valid", dilation=(2, 3)),
    "dilation_stride_nobias": dict(kernel_size=3, stride=2, dilation=2, padding=2, bias=False),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("cfg", list(CONVS), ids=list(CONVS))
def test_conv2d_per_example_gradient(cfg):
    torch.manual_seed(0)
    module = nn.Conv2d(3, 4, **CONVS[cfg])
    a, s = check_layer(module, randn(3, 3, 9, 8))
    with torch.no_grad():
        h, w = module(randn(1, 3, 9, 8)).shape[-2:]
    assert a.shape[1] == h * w  # one token per output position, none dropped or added


def test_conv2d_unbatched_input():
    torch.manual_seed(0)
    module = nn.Conv2d(2, 3, 3, padding=1).double()
    model = nn.Sequential(module)
    layers = find_tracked_layers(model)
    x = randn(2, 5, 5)
    with LayerCapture(model, layers, dtype=torch.float64) as cap:
        acts, grads = cap.collect(torch.tanh(model(x)).sum())
    module.zero_grad()
    torch.tanh(module(x)).sum().backward()
    expected = torch.cat([module.weight.grad.reshape(3, -1), module.bias.grad[:, None]], 1)
    torch.testing.assert_close(torch.einsum("bto,bti->oi", grads["0"], acts["0"]), expected)


@pytest.mark.parametrize("kwargs, word", [
    (dict(groups=2), "groups=2"),
    (dict(padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
])
def test_unsupported_conv2d_raises_with_fix(kwargs, word):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, **kwargs), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TrackingError, match="Exclude it") as err:
        find_tracked_layers(model)
    assert word in str(err.value) and "'0'" in str(err.value)
    # The fix named in the message works: the other layers alone can be tracked.
    assert list(find_tracked_layers(model, types=[nn.Linear])) == ["2"]
    assert list(find_tracked_layers(model, "2")) == ["2"]


def test_no_trackable_module_lists_modules():
    model = nn.Sequential(nn.Embedding(5, 3), nn.ReLU(), nn.LayerNorm(3))
    with pytest.raises(TrackingError, match="no trackable module") as err:
        find_tracked_layers(model)
    msg = str(err.value)
    for item in ("0 (Embedding)", "1 (ReLU)", "2 (LayerNorm)", "Linear", "Conv1D", "Conv2d"):
        assert item in msg


def test_frozen_only_model_raises():
    model = models.mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(TrackingError, match="trainable"):
        find_tracked_layers(model)


def test_pattern_matching_nothing_raises():
    model = models.mlp()
    with pytest.raises(TrackingError, match=r"mlp\.\*") as err:
        find_tracked_layers(model, ["0", "mlp.*"])
    assert "0 (Linear)" in str(err.value)


def test_selection_by_patterns_types_and_exclude():
    model = models.tiny_gpt2()
    everything = find_tracked_layers(model)
    names = list(everything)
    assert names == [n for n, _ in model.named_modules() if n in everything]  # module order
    assert {l.kind for l in everything.values()} == {"conv1d", "linear"}
    assert "lm_head" in everything and everything["lm_head"].has_bias is False
    attn = everything["transformer.h.0.attn.c_attn"]
    assert (attn.kind, attn.d_out, attn.d_in, attn.has_bias) == ("conv1d", 24, 9, True)

    mlp = find_tracked_layers(model, "transformer.h.*.mlp.*")
    assert list(mlp) == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert mlp["transformer.h.0.mlp.c_fc"].shape == (32, 9)
    assert mlp["transformer.h.0.mlp.c_proj"].shape == (8, 33)

    assert list(find_tracked_layers(model, types=[nn.Linear])) == ["lm_head"]
    assert "lm_head" not in find_tracked_layers(model, types=[Conv1D])
    several = find_tracked_layers(model, ["*.c_attn", "lm_head"])
    assert list(several) == ["transformer.h.0.attn.c_attn", "lm_head"]

    excluded = find_tracked_layers(model, exclude=["*.attn.*", "lm_head"])
    assert list(excluded) == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert list(find_tracked_layers(model, "transformer.*", exclude="*.c_fc")) == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]
    with pytest.raises(TrackingError):
        find_tracked_layers(model, "lm_head", exclude="lm_head")


def test_frozen_layers_are_not_selected():
    model = models.mlp()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    assert list(find_tracked_layers(model)) == ["2"]


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_on_exception():
    model = models.mlp()
    layers = find_tracked_layers(model)
    x, y = models.mlp_data(4)
    with LayerCapture(model, layers) as cap:
        assert _hook_count(model) == len(layers)
        cap.collect(F.cross_entropy(model(x), y))
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with LayerCapture(model, layers):
            model(x)
            raise RuntimeError("boom")
    assert _hook_count(model) == 0
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    # Nothing is recorded by a model used outside the context.
    cap = LayerCapture(model, layers)
    model(x)
    assert cap._inputs == {} and cap._anchor is None


class Shared(nn.Module):
    """One Linear applied twice (weight sharing), to different inputs."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        h = torch.tanh(self.shared(h) + h)
        return self.head(h)


@pytest.mark.parametrize("seq", [False, True])
def test_shared_layer_contributes_both_calls(seq):
    torch.manual_seed(0)
    model = Shared().double()
    x = randn(4, 3, 4) if seq else randn(4, 4)
    y = torch.randint(0, 3, x.shape[:-1], generator=torch.Generator().manual_seed(2))
    layers = find_tracked_layers(model)

    def loss_fn(out, target):
        return F.cross_entropy(out.reshape(-1, 3), target.reshape(-1), reduction="sum")

    with LayerCapture(model, layers, dtype=torch.float64) as cap:
        acts, grads = cap.collect(loss_fn(model(x), y))
    tokens = 3 if seq else 1
    assert acts["shared"].shape == (4, 2 * tokens, 6) and acts["inp"].shape == (4, tokens, 5)

    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for name in ("inp", "shared", "head"):
        expected = expected_matrix_grad(model.get_submodule(name),
                                        {"weight": g[f"{name}.weight"], "bias": g[f"{name}.bias"]})
        torch.testing.assert_close(torch.einsum("bto,bti->boi", grads[name], acts[name]), expected)


def test_parameters_frozen_inside_capture_and_restored():
    """Inside the capture no parameter requires grad (no weight gradient is kept or computed);
    the flags come back on exit, also after an exception, and user-frozen ones stay frozen."""
    model = models.mlp()
    layers = find_tracked_layers(model)
    model[0].bias.requires_grad_(False)  # a user's choice, left as it was
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = models.mlp_data(4)
    with LayerCapture(model, layers) as cap:
        assert not any(p.requires_grad for p in model.parameters())
        cap.collect(F.cross_entropy(model(x), y))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    with pytest.raises(RuntimeError, match="boom"):
        with LayerCapture(model, layers):
            raise RuntimeError("boom")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


def test_layer_frozen_after_selection_still_gets_exact_gradients():
    """A tracked layer whose weights were frozen after selection (so nothing before it needs grad)
    still gets the exact gradient of its output: the taps carry it."""
    torch.manual_seed(0)
    model = models.mlp().double()
    layers = find_tracked_layers(model)
    for p in model[0].parameters():
        p.requires_grad_(False)
    x, y = models.mlp_data(4)
    x = x.double()
    with LayerCapture(model, layers, dtype=torch.float64) as cap:
        acts, grads = cap.collect(F.cross_entropy(model(x), y, reduction="sum"))
    h = model[0](x).detach().requires_grad_()
    out = model[2](model[1](h))
    expected = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), h)[0]
    torch.testing.assert_close(grads["0"][:, 0], expected)


def test_inplace_activation_after_layer_gets_the_layers_own_gradient():
    """ReLU(inplace=True) right after a conv/linear modifies its output in place; the gradient
    captured must be the one w.r.t. the layer's output (before the ReLU), not the ReLU's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(12, 4),
                          nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    layers = find_tracked_layers(model)
    x = randn(5, 2, 4, 4)
    y = torch.randint(0, 2, (5,), generator=torch.Generator().manual_seed(1))
    with LayerCapture(model, layers, dtype=torch.float64) as cap:
        acts, grads = cap.collect(F.cross_entropy(model(x), y, reduction="sum"))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0), reduction="sum")

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for name in ("0", "3", "5"):
        expected = expected_matrix_grad(model.get_submodule(name),
                                        {"weight": g[f"{name}.weight"], "bias": g[f"{name}.bias"]})
        torch.testing.assert_close(torch.einsum("bto,bti->boi", grads[name], acts[name]), expected)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_forward_without_gradients_error_is_clear(ctx):
    model = models.mlp()
    layers = find_tracked_layers(model)
    x, _ = models.mlp_data(4)
    with LayerCapture(model, layers) as cap:
        with ctx():
            model(x)
        with pytest.raises(TrackingError, match="gradients disabled") as err:
            cap.collect(torch.zeros((), requires_grad=True))
    assert "inference_mode=False" in str(err.value)


def test_unknown_tracked_module_raises():
    model = models.mlp()
    layers = find_tracked_layers(models.convnet())
    with pytest.raises(TrackingError, match="not in"):
        LayerCapture(model, layers)


def test_uncalled_module_raises():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)}).double()
    layers = find_tracked_layers(model)
    with LayerCapture(model, layers) as cap:
        model["used"](randn(2, 3))
        with pytest.raises(TrackingError, match="'unused' was not called"):
            cap.collect(torch.zeros((), requires_grad=True))


class Checkpointed(nn.Module):
    """Two tracked layers inside a non-reentrant activation checkpoint, one after it."""

    def __init__(self, use_checkpoint: bool):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.use_checkpoint = use_checkpoint

    def segment(self, x):
        return torch.tanh(self.b(torch.tanh(self.a(x))))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.segment, x, use_reentrant=False) if self.use_checkpoint else self.segment(x)
        return self.c(h)


def test_activation_checkpointing_gives_the_same_tokens():
    """The recomputation in the backward calls the hooks again: it must be tapped like the original
    forward (or checkpointing sees other saved tensors) and must not count as a second call."""
    torch.manual_seed(0)
    model = Checkpointed(False).double()
    layers = find_tracked_layers(model)
    x = randn(5, 4)
    y = torch.randint(0, 3, (5,), generator=torch.Generator().manual_seed(1))
    results = []
    for use in (False, True):
        model.use_checkpoint = use
        with LayerCapture(model, layers, dtype=torch.float64) as cap:
            results.append(cap.collect(F.cross_entropy(model(x), y, reduction="sum")))
    (acts, grads), (acts_ck, grads_ck) = results
    for name in layers:
        assert acts_ck[name].shape == acts[name].shape  # one call, not two
        torch.testing.assert_close(acts_ck[name], acts[name])
        torch.testing.assert_close(grads_ck[name], grads[name])
