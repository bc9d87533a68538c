"""Layer tracking: which modules influence is computed for, and per-token capture.

Every tracked layer is seen as a matrix W of shape ``(d_out, d_in)`` acting on one
token at a time (``docs/method.md``, notation): ``nn.Linear`` and transformers'
``Conv1D`` on the last dimension of any ``[..., d]`` input, ``nn.Conv2d`` on
unfolded patches (each output position is a token). A bias is one more input
column of ones.

:class:`LayerCapture` is a context manager that records, for one forward pass,
each tracked layer's input activations ``a`` ``[B, T, d_in]`` and, during the backward,
its output gradients ``s`` ``[B, T, d_out]``, handing each layer over as soon as its
gradient is known; parameters' ``.grad`` are never touched.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from lightning_influence.errors import TrackingError

__all__ = ["TrackedLayer", "LayerCapture", "find_tracked_layers", "layer_weight_matrix", "masked_tokens", "token_count",
           "per_example_gradients", "model_mode"]



def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or moved: Conv1D simply is not trackable then
        return None
    return Conv1D


SUPPORTED_TYPES = ("Linear", "Conv1D", "Conv2d")


@dataclass(frozen=True)
class TrackedLayer:
    """A tracked module with its matrix view: ``d_out x d_in`` (``d_in`` includes the bias column)."""

    name: str
    kind: str  # "linear" | "conv1d" | "conv2d"
    d_out: int
    d_in: int
    has_bias: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in)


def _describe(module: nn.Module, name: str) -> TrackedLayer:
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        has_bias = module.bias is not None
        return TrackedLayer(name, "linear", module.out_features, module.in_features + has_bias, has_bias)
    if conv1d is not None and isinstance(module, conv1d):
        has_bias = getattr(module, "bias", None) is not None
        d_in, d_out = module.weight.shape  # Conv1D stores (in, out)
        return TrackedLayer(name, "conv1d", d_out, d_in + has_bias, has_bias)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise TrackingError(
                f"Conv2d '{name}' has groups={module.groups}; only groups=1 is supported. "
                "Exclude it with `modules=` patterns (e.g. track only the other layers)."
            )
        if module.padding_mode != "zeros":
            raise TrackingError(
                f"Conv2d '{name}' uses padding_mode='{module.padding_mode}'; only 'zeros' is supported. "
                "Exclude it with `modules=` patterns."
            )
        has_bias = module.bias is not None
        kh, kw = module.kernel_size
        return TrackedLayer(name, "conv2d", module.out_channels, module.in_channels * kh * kw + has_bias, has_bias)
    raise TrackingError(f"module '{name}' of type {type(module).__name__} is not trackable")


def _is_trackable(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, (nn.Linear, nn.Conv2d)) or (conv1d is not None and isinstance(module, conv1d))


def find_tracked_layers(
    model: nn.Module,
    patterns: str | Sequence[str] | None = None,
    types: Iterable[type] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, TrackedLayer]:
    """Select the layers to track, in the model's module order.

    Args:
        model: the network.
        patterns: glob patterns over module names (``"transformer.h.*.mlp.*"``); ``None`` keeps all.
        types: module classes to keep (e.g. ``[nn.Linear]``); ``None`` keeps every supported type.
        exclude: glob patterns of module names to drop.

    Raises:
        TrackingError: when nothing trackable is selected (the message lists the model's modules),
            or when a pattern matches no module at all.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if isinstance(exclude, str):
        exclude = [exclude]
    type_tuple = tuple(types) if types is not None else None
    named = [(n, m) for n, m in model.named_modules() if n]
    if patterns is not None:
        repeated = sorted({p for p in patterns if list(patterns).count(p) > 1})
        if repeated:
            raise TrackingError(f"module pattern(s) {repeated} are listed more than once; list each pattern once")
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n, _ in named)]
        if unmatched:
            raise TrackingError(
                f"module pattern(s) {unmatched} match no module of {type(model).__name__}. "
                f"Its modules are: {_module_listing(model)}"
            )
    selected: dict[str, TrackedLayer] = {}
    for name, module in named:
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if type_tuple is not None and not isinstance(module, type_tuple):
            continue
        if not _is_trackable(module):
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue  # frozen layers have no influence to attribute
        if patterns is not None and len(patterns) > 1:
            hits = [p for p in patterns if fnmatch.fnmatchcase(name, p)]
            if len(hits) > 1:
                raise TrackingError(
                    f"module '{name}' is selected by overlapping patterns {hits}; make the patterns disjoint so "
                    "that each module is selected by exactly one"
                )
        selected[name] = _describe(module, name)
    owners: dict[int, str] = {}
    for name in selected:
        weight = model.get_submodule(name).weight
        if id(weight) in owners:
            raise TrackingError(
                f"modules '{owners[id(weight)]}' and '{name}' share one weight tensor; its influence would be "
                "counted twice. Track only one of them (e.g. exclude=['" + name + "'])"
            )
        owners[id(weight)] = name
    if not selected:
        raise TrackingError(
            f"no trackable module selected in {type(model).__name__} (patterns={patterns}, types={types}). "
            f"Supported types: {', '.join(SUPPORTED_TYPES)} with trainable weights. "
            f"The model's modules are: {_module_listing(model)}"
        )
    return selected


def _module_listing(model: nn.Module, limit: int = 40) -> str:
    items = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n]
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more if items else "(none)"


def layer_weight_matrix(module: nn.Module, layer: TrackedLayer) -> torch.Tensor:
    """The layer's parameters as the ``(d_out, d_in)`` matrix (bias as the last column)."""
    weight = module.weight
    if layer.kind == "conv1d":
        weight = weight.t()
    weight = weight.reshape(layer.d_out, -1)
    if layer.has_bias:
        weight = torch.cat([weight, module.bias.reshape(-1, 1)], dim=1)
    return weight


def _input_tokens(module: nn.Module, layer: TrackedLayer, x: torch.Tensor) -> torch.Tensor:
    """Layer input -> per-token activations ``[B, T, d_in]`` (bias column included)."""
    if layer.kind == "conv2d":
        if x.dim() == 3:  # unbatched image
            x = x.unsqueeze(0)
        if isinstance(module.padding, str):
            if module.padding == "same":
                x = F.pad(x, module._reversed_padding_repeated_twice)
            padding = 0
        else:
            padding = module.padding
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        a = patches.transpose(1, 2)  # [B, L, C*kh*kw]
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() >= 2 else x.reshape(1, 1, -1)
    if layer.has_bias:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    return a


def _output_tokens(layer: TrackedLayer, g: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the layer output -> per-token ``[B, T, d_out]``."""
    if layer.kind == "conv2d":
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1]) if g.dim() >= 2 else g.reshape(1, 1, -1)


def _ignore(grad: torch.Tensor) -> None:
    return None


class _Tap(torch.autograd.Function):
    """Identity on a tracked layer's output whose backward hands ``d loss / d output`` to a callback.

    The output is cloned so that in-place operations after the layer (``ReLU(inplace=True)``)
    modify the clone, and the gradient received is the one w.r.t. the layer's own output.
    ``anchor`` is a scalar leaf shared by every tap of a pass: differentiating the loss with
    respect to it runs the backward through every tap, without computing parameter gradients
    or holding every layer's output gradient until the end.
    """

    @staticmethod
    def forward(ctx, output, anchor, on_grad):
        ctx.on_grad = on_grad
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.on_grad(grad)
        return grad, None, None


class LayerCapture:
    """Context manager giving each tracked layer's activations and output gradients for a loss.

    Streaming use (what the statistics and scoring passes do)::

        with LayerCapture(model, layers) as cap:
            loss = task.train_loss(model, batch)
            cap.backward(loss, consume)   # consume(name, a [B, T, d_in], s [B, T, d_out]) per layer

    ``consume`` runs inside the backward pass, as soon as a layer's output gradient is known,
    and the layer's activations are released right after it: only the layers whose gradients
    are still to come are held. With ``on_activation(name, a)`` given, activations are handed
    over during the forward instead and not kept at all (``consume`` then gets ``a=None``).

    Collecting use (tests, small models)::

        acts, grads = cap.collect(loss)   # dicts name -> [B, T, d_in] / [B, T, d_out]

    A module called several times in one forward (weight sharing) contributes the
    concatenation of its calls along the token axis. Tensors are given in ``dtype``.

    Inside the context every parameter of the model has ``requires_grad=False`` (restored on
    exit): no parameter gradient is ever needed, and autograd then does not keep each
    layer's input for a weight gradient; the gradient flows from the taps on the tracked
    layers' outputs instead. Parameters' ``.grad`` are never touched. Hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, layers: dict[str, TrackedLayer], dtype: torch.dtype = torch.float32,
                 on_activation=None):
        self.model = model
        self.layers = layers
        self.dtype = dtype
        self.on_activation = on_activation
        self._handles: list = []
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise TrackingError(f"tracked module(s) {missing} are not in {type(model).__name__}")
        self._modules = {n: modules[n] for n in layers}
        self._in_backward = False
        self._frozen: list[nn.Parameter] = []
        self.reset()

    def __enter__(self) -> "LayerCapture":
        self._frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in self._frozen:
            p.requires_grad_(False)
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
        self.reset()

    def reset(self) -> None:
        self._anchor = None
        self._inputs: dict[str, list[torch.Tensor | None]] = {}
        self._grads: dict[str, dict[int, torch.Tensor]] = {}
        self._shapes: dict[str, list[tuple[torch.Size, torch.device]]] = {}
        self._called_without_grad: set[str] = set()
        self._consume = None

    def _make_hook(self, name: str):
        layer = self.layers[name]

        def hook(module, inputs, output):
            if self._in_backward:
                # A forward recomputed during the backward (activation checkpointing) is not a new call; it
                # is tapped like the original (so that it saves the same tensors) but its taps report nothing.
                if self._anchor is None or not torch.is_grad_enabled():
                    return None
                return _Tap.apply(output, self._anchor, _ignore)
            if not torch.is_grad_enabled():
                self._called_without_grad.add(name)  # nothing to differentiate; say so if asked
                return None
            a = _input_tokens(module, layer, inputs[0].detach())
            if self.on_activation is not None:
                self.on_activation(name, a.to(self.dtype))
                a = None
            calls = self._inputs.setdefault(name, [])
            index = len(calls)
            calls.append(a)
            self._shapes.setdefault(name, []).append((output.shape, output.device))
            if self._anchor is None:
                self._anchor = torch.zeros((), device=output.device, requires_grad=True)
            return _Tap.apply(output, self._anchor, lambda g: self._received(name, index, g))

        return hook

    def _check_called(self) -> None:
        for name in self.layers:
            if name not in self._inputs and name in self._called_without_grad:
                raise TrackingError(
                    f"tracked module '{name}' ran with gradients disabled (torch.no_grad / inference_mode), "
                    "so no output gradient can be taken. Run the pass with gradients enabled "
                    "(Trainer(inference_mode=False), torch.enable_grad())."
                )
            if name not in self._inputs:
                raise TrackingError(
                    f"tracked module '{name}' was not called in the forward pass; "
                    "exclude it with `modules=` or check the task's forward."
                )

    def _received(self, name: str, index: int, grad: torch.Tensor) -> None:
        got = self._grads.setdefault(name, {})
        got[index] = _output_tokens(self.layers[name], grad.detach())
        if len(got) == len(self._inputs[name]):
            self._finish(name)

    def _finish(self, name: str) -> None:
        """Hand a layer whose every call has its gradient to the consumer, then drop its tensors."""
        calls = self._inputs.pop(name)
        got = self._grads.pop(name, {})
        grads = []
        for i, (shape, device) in enumerate(self._shapes[name]):
            g = got.get(i)
            if g is None:  # this call's output did not reach the loss: zero gradient
                g = _output_tokens(self.layers[name], torch.zeros(shape, dtype=self.dtype, device=device))
            grads.append(g.to(self.dtype))
        s = torch.cat(grads, dim=1) if len(grads) > 1 else grads[0]
        a = None
        if calls[0] is not None:
            a = torch.cat([c.to(self.dtype) for c in calls], dim=1) if len(calls) > 1 else calls[0].to(self.dtype)
        del calls, grads, got
        self._consume(name, a, s)

    def backward(self, loss: torch.Tensor, consume, retain_graph: bool = False) -> None:
        """Differentiate ``loss`` and call ``consume(name, a, s)`` once per tracked layer.

        Layers are handed over in backward order, each as soon as its gradient is complete;
        a layer whose output did not reach the loss gets zeros. Clears the recorded tensors.
        """
        self._check_called()
        self._consume = consume
        self._in_backward = True
        try:
            if loss.requires_grad:
                torch.autograd.grad(loss, self._anchor, retain_graph=retain_graph, allow_unused=True)
            for name in [n for n in self.layers if n in self._inputs]:
                self._finish(name)  # calls whose outputs the loss does not depend on
        finally:
            self._in_backward = False
            self.reset()

    def collect(self, loss: torch.Tensor, retain_graph: bool = False):
        """Activations and output gradients for ``loss`` as two dicts in layer order; clears the record."""
        acts: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}

        def keep(name, a, s):
            acts[name], grads[name] = a, s

        self.backward(loss, keep, retain_graph=retain_graph)
        order = list(self.layers)
        return ({n: acts[n] for n in order if acts.get(n) is not None}, {n: grads[n] for n in order})


def masked_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the tokens of ``x`` ``[B, T, d]`` where ``mask`` ``[B, T']`` is 0.

    The mask applies when the layer's token axis is the batch's sequence axis (or a
    whole multiple of it, for a module called several times); other layers (a pooled
    classifier head, a conv net) see every token.
    """
    if mask is None:
        return x
    b, t = x.shape[0], x.shape[1]
    if mask.shape[0] != b or t % mask.shape[1] != 0 or bool(mask.all()):
        return x  # nothing to zero: skip a full copy of the activations
    m = mask.to(dtype=x.dtype, device=x.device)
    if t != mask.shape[1]:
        m = m.repeat(1, t // mask.shape[1])
    return x * m.unsqueeze(-1)


def token_count(x: torch.Tensor, mask: torch.Tensor | None) -> float:
    b, t = x.shape[0], x.shape[1]
    if mask is None or mask.shape[0] != b or t % mask.shape[1] != 0:
        return float(b * t)
    return float(mask.to(torch.float64).sum()) * (t // mask.shape[1])


def per_example_gradients(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``DW_b = sum_t s_bt a_bt^T`` for every example: ``[B, d_out, d_in]``."""
    return grads.transpose(1, 2) @ acts


@contextmanager
def model_mode(model: nn.Module, train: bool = False):
    """Put the model in eval (or train) mode for a pass and restore each module's mode after."""
    modes = {m: m.training for m in model.modules()}
    model.train(train)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
