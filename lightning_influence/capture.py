"""Layer tracking: which modules influence is computed for, and per-token capture.

Every tracked layer is seen as a matrix W of shape ``(d_out, d_in)`` acting on one
token at a time (``docs/method.md``, notation): ``nn.Linear`` and transformers'
``Conv1D`` on the last dimension of any ``[..., d]`` input, ``nn.Conv2d`` on
unfolded patches (each output position is a token). A bias is one more input
column of ones.

Token layouts. Per-example gradients need to know which axis of a layer's input is the
batch. Given the batch size (``task.batch_size(batch)``), each call of a tracked layer is
read as one of:

* batch-first ``[B, ...positions, d]`` or sequence-first ``[T, B, ..., d]``: decided by the
  model where it says so (a ``batch_first`` attribute on the layer or an enclosing module,
  as ``nn.MultiheadAttention``/``nn.Transformer*`` have; Hugging Face models are batch-first;
  :func:`set_token_layout` declares it for any module), otherwise by the shape: the axis
  (0 or 1) whose size is the batch size. When both are (``T == B``) and nothing declares the
  layout, :class:`TrackingError` is raised rather than guessing.
* two-dimensional ``[N, d]``: one row per example (``N == B``), the batch's ``B*T`` token
  positions flattened (token routing: ``x.reshape(-1, d)`` of ``[B, T, d]``; ``[T, B]`` order
  for a sequence-first layer), or only its real tokens packed in row-major order
  (``x[mask.bool()]``, ``N`` = number of real tokens). The last two need the task's token mask.

The task's token mask ``[B, T]`` is mapped onto each layer's token positions explicitly: the
one position axis of size ``T`` (the mask is repeated over the others, e.g. the heads of
``[B, T, H, d]``); a layer with one token per example (a pooled classifier head) has nothing
to mask. A layer whose positions cannot be matched to the mask raises. Captured tokens are
handed over batch-first ``[B, L, d]`` with padded positions zeroed.

Tied weights. A layer whose weight is also a parameter of an untracked module (GPT-2's
``lm_head.weight`` is ``wte.weight``) would contribute only its own part of the shared
parameter's gradient. The default selection (no ``patterns``) leaves such layers out with a
logged reason; a pattern that selects one explicitly keeps it, with a warning.

:class:`LayerCapture` is a context manager that records, for one forward pass,
each tracked layer's input activations ``a`` ``[B, T, d_in]`` and, during the backward,
its output gradients ``s`` ``[B, T, d_out]``, handing each layer over as soon as its
gradient is known; parameters' ``.grad`` are never touched.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from lightning_influence.errors import TaskInputError, TrackingError

__all__ = ["TrackedLayer", "LayerCapture", "find_tracked_layers", "NAMED_SELECTIONS", "expand_named_selection", "layer_weight_matrix", "set_token_layout",
           "TOKEN_LAYOUTS", "per_example_gradients", "squared_per_example_sum", "per_example_chunk", "model_mode"]

log = logging.getLogger(__name__)



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


# Named selections: ``modules="mlp"`` or ``"attention"`` stand for the layers of that kind in the usual
# transformers layouts (the paper's and Kronfluence's language-model experiments use the MLP layers).
# Each layout lists module-name patterns in which ``*`` is one name segment (a layer index), matched
# anywhere below the root (``transformer.h.0.mlp.c_fc`` and a wrapper's ``model.transformer.h.0.mlp.c_fc``
# alike). A layout is used when each of its patterns matches a module of the model.
NAMED_SELECTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "mlp": {
        "GPT-2": ("h.*.mlp.c_fc", "h.*.mlp.c_proj"),
        "Llama/Mistral/Qwen": ("layers.*.mlp.gate_proj", "layers.*.mlp.up_proj", "layers.*.mlp.down_proj"),
        "BERT/RoBERTa": ("encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"),
        "GPT-NeoX/Pythia": ("layers.*.mlp.dense_h_to_4h", "layers.*.mlp.dense_4h_to_h"),
        "OPT": ("layers.*.fc1", "layers.*.fc2"),
    },
    "attention": {
        "GPT-2": ("h.*.attn.c_attn", "h.*.attn.c_proj"),
        "Llama/Mistral/Qwen/OPT": ("layers.*.self_attn.q_proj", "layers.*.self_attn.k_proj",
                                   "layers.*.self_attn.v_proj", "layers.*.self_attn.o_proj|layers.*.self_attn.out_proj"),
        "BERT/RoBERTa": ("encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.key",
                         "encoder.layer.*.attention.self.value", "encoder.layer.*.attention.output.dense"),
        "GPT-NeoX/Pythia": ("layers.*.attention.query_key_value", "layers.*.attention.dense"),
    },
}


def _segment_regex(pattern: str) -> re.Pattern:
    """A named selection's pattern as a regex: ``*`` is one name segment, ``|`` separates alternatives,
    and the match may start below the root."""
    alternatives = ["\\.".join("[^.]+" if part == "*" else re.escape(part) for part in alt.split("."))
                    for alt in pattern.split("|")]
    return re.compile(r"(?:.+\.)?(?:" + "|".join(alternatives) + ")")


def expand_named_selection(model: nn.Module, name: str) -> list[str]:
    """The module names that the named selection ``name`` (``"mlp"``, ``"attention"``) picks in ``model``.

    Raises :class:`TrackingError` naming the known layouts and the glob patterns to pass instead
    when none of the layouts of :data:`NAMED_SELECTIONS` fits the model.
    """
    names = [n for n, m in model.named_modules() if n and _is_trackable(m)]
    chosen: list[str] = []
    for patterns in NAMED_SELECTIONS[name].values():
        regexes = [_segment_regex(p) for p in patterns]
        hits = [[n for n in names if r.fullmatch(n)] for r in regexes]
        if all(hits):
            chosen += [n for n in names if any(r.fullmatch(n) for r in regexes) and n not in chosen]
    if not chosen:
        known = "; ".join(f"{layout}: {', '.join(p)}" for layout, p in NAMED_SELECTIONS[name].items())
        raise TrackingError(
            f"modules={name!r} names the {name} layers of the usual transformers layouts ({known}), and "
            f"{type(model).__name__} has none of them. Pass glob patterns of its own module names instead "
            f"(e.g. modules=['*.{name}.*']). Its trackable modules are: "
            f"{', '.join(names[:40]) + (' ...' if len(names) > 40 else '') if names else '(none)'}")
    return [n for n in names if n in chosen]  # in the model's module order


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
            A named selection, ``"mlp"`` or ``"attention"`` (alone or in the list), stands for those
            layers in the usual transformers layouts (:data:`NAMED_SELECTIONS`: GPT-2, Llama/Mistral,
            BERT, GPT-NeoX, OPT), unless a module is literally called that.
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
        expanded: list[str] = []
        for p in patterns:
            # A named selection, unless the model has a trackable module of that very name.
            literal = any(fnmatch.fnmatchcase(n, p) and _is_trackable(m) for n, m in named)
            expanded += expand_named_selection(model, p) if p in NAMED_SELECTIONS and not literal else [p]
        patterns = expanded
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
                f"counted twice. Track at most one of them: exclude both (exclude=['{owners[id(weight)]}', '{name}']), "
                f"or name one in `modules=` patterns (it then counts only its own use of the weight; a warning says so)"
            )
        owners[id(weight)] = name
    left_out = _handle_tied_weights(model, selected, explicit=patterns is not None)
    if not selected:
        tied = f" Left out because their weights are tied to untracked modules: {left_out}." if left_out else ""
        raise TrackingError(
            f"no trackable module selected in {type(model).__name__} (patterns={patterns}, types={types}). "
            f"Supported types: {', '.join(SUPPORTED_TYPES)} with trainable weights.{tied} "
            f"The model's modules are: {_module_listing(model)}"
        )
    return selected


def _handle_tied_weights(model: nn.Module, selected: dict[str, TrackedLayer], explicit: bool) -> list[str]:
    """Leave out (default selection) or warn about (explicit patterns) layers whose parameters are tied to
    an untracked module; returns the names left out.

    The captured ``sum_t s_t a_t^T`` is the gradient through this layer's use of the parameter only: the
    untracked module's use (GPT-2's ``wte`` lookup of ``lm_head.weight``) adds a part that influence
    would then miss.
    """
    users: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            users.setdefault(id(param), []).append(mod_name or "<root>")
    left_out = []
    for name in list(selected):
        module = model.get_submodule(name)
        others = sorted({u for p in module.parameters(recurse=False) for u in users.get(id(p), [])
                         if u != name and u not in selected})
        if not others:
            continue
        why = (f"module '{name}' shares its weight with untracked module(s) {others} (tied weights): influence "
               "through it would count only this layer's part of the shared parameter's gradient, not the part "
               "from the other module(s)")
        if explicit:
            warnings.warn(f"{why}. It is tracked because a pattern selects it; exclude it (exclude=['{name}']) "
                          "to silence this warning.", UserWarning, stacklevel=3)
        else:
            log.warning("%s. Left out of the default selection; select it with a `modules=` pattern to track "
                        "it anyway.", why)
            del selected[name]
            left_out.append(name)
    return left_out


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


TOKEN_LAYOUTS = ("batch_first", "seq_first")
_LAYOUT_ATTR = "_influence_token_layout"


def set_token_layout(module: nn.Module, layout: str) -> nn.Module:
    """Declare whether the tracked layers in ``module`` see ``[B, T, ...]`` or ``[T, B, ...]`` inputs.

    ``layout`` is ``"batch_first"`` or ``"seq_first"``; it applies to ``module`` and every module
    inside it (the nearest declaration wins) and takes precedence over ``batch_first``
    attributes and over the shape-based detection. Needed only when nothing in the model says
    it and a batch's size equals its sequence length (``T == B``). Returns ``module``.
    """
    if layout not in TOKEN_LAYOUTS:
        raise TrackingError(f"token layout must be one of {TOKEN_LAYOUTS}, got {layout!r}")
    setattr(module, _LAYOUT_ATTR, layout)
    return module


def _pretrained_type():
    try:
        from transformers import PreTrainedModel
    except Exception:  # transformers missing: no model is one of its
        return None
    return PreTrainedModel


def _declared_layout(model: nn.Module, name: str) -> str | None:
    """The layout the model states for layer ``name``: from the layer outwards, the nearest of
    :func:`set_token_layout`, a boolean ``batch_first`` attribute (``nn.MultiheadAttention``, ``nn.Transformer``;
    ``nn.TransformerEncoderLayer`` through its ``self_attn``), or a Hugging Face model (always batch-first)."""
    pretrained = _pretrained_type()
    parts = name.split(".")
    for depth in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        declared = getattr(module, _LAYOUT_ATTR, None)
        if declared is not None:
            return declared
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            return "batch_first" if module.self_attn.batch_first else "seq_first"
        flag = module.__dict__.get("batch_first")
        if isinstance(flag, bool):
            return "batch_first" if flag else "seq_first"
        if pretrained is not None and isinstance(module, pretrained):
            return "batch_first"
    return None


class _TokenView:
    """How one call of a tracked layer maps onto the batch: its layout, and its token mask ``[B, L]``.

    ``kind`` is ``"batch_first"`` / ``"seq_first"`` (structured inputs), ``"flat"`` / ``"flat_seq_first"``
    (``[B*T, d]`` rows in ``[B, T]`` / ``[T, B]`` order) or ``"packed"`` (only the real tokens, row-major).
    """

    def __init__(self, kind: str, batch: int, mask: torch.Tensor | None, full_mask: torch.Tensor | None):
        self.kind = kind
        self.batch = batch
        self.mask = mask  # bool [B, L] of the layer's real tokens, or None when every token counts
        self.full_mask = full_mask  # the task's [B, T] mask (flat and packed layouts)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The layer-side tensor (input or output gradient, features last) as batch-first ``[B, L, d]``."""
        b, d = self.batch, x.shape[-1]
        if self.kind == "batch_first":
            return x.reshape(b, -1, d)
        if self.kind == "seq_first":
            return x.transpose(0, 1).reshape(b, -1, d)
        t = self.full_mask.shape[1]
        if self.kind == "flat":
            return x.reshape(b, t, d)
        if self.kind == "flat_seq_first":
            return x.reshape(t, b, d).transpose(0, 1)
        out = x.new_zeros(b, t, d)  # packed: real tokens back at their positions, padding stays zero
        out[self.full_mask] = x
        return out

    def count(self, positions: int) -> float:
        """The number of real tokens among the ``B x positions`` this view hands over."""
        if self.mask is None:
            return float(self.batch * positions)
        return float(self.mask.sum())

    def apply_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return tokens
        return tokens * self.mask.to(device=tokens.device, dtype=tokens.dtype).unsqueeze(-1)


def _layout_error(name: str, x: torch.Tensor, batch: int, why: str) -> TrackingError:
    return TrackingError(
        f"tracked layer '{name}' got an input of shape {tuple(x.shape)} for a batch of {batch} examples: {why}. "
        "Exclude the layer with `modules=`/`exclude=` patterns, or declare its layout with "
        "lightning_influence.capture.set_token_layout(module, 'batch_first' | 'seq_first')"
    )


def _position_mask(name: str, positions: tuple[int, ...], batch: int, mask: torch.Tensor | None,
                   x: torch.Tensor) -> torch.Tensor | None:
    """The task's ``[B, T]`` mask on a batch-first layer's position axes ``positions``, as ``[B, L]``."""
    if mask is None or math.prod(positions) <= 1:
        return None  # one token per example (pooled head): nothing to mask
    t = mask.shape[1]
    axes = [i for i, size in enumerate(positions) if size == t]
    if len(axes) != 1:
        raise TrackingError(
            f"tracked layer '{name}' has token positions {tuple(positions)} per example (input {tuple(x.shape)}), "
            f"which cannot be matched to the task's token mask of length {t}: "
            + ("no position axis has that length" if not axes else f"axes {axes} all have that length")
            + ". Padding could not be excluded from this layer. Exclude the layer with `modules=`/`exclude=` "
            "patterns, or give a task whose token_mask() matches the layer's sequence axis (or returns None)"
        )
    shape = [batch] + [1] * len(positions)
    shape[1 + axes[0]] = t
    return mask.reshape(shape).expand(batch, *positions).reshape(batch, -1)


def _token_view(name: str, module: nn.Module, layer: TrackedLayer, x: torch.Tensor, output: torch.Tensor,
                batch: int | None, mask: torch.Tensor | None, declared: str | None) -> _TokenView:
    """Decide how the call ``module(x)`` lays out the batch (see the module docstring); raise when it cannot."""
    if batch is None and mask is not None:
        batch = mask.shape[0]
    if batch is None:  # no batch size to check against: the batch axis is the declared one, else axis 0
        declared = declared or "batch_first"
        if x.dim() == 1 or (layer.kind == "conv2d" and x.dim() == 3):
            batch = 1
        else:
            batch = x.shape[1] if declared == "seq_first" and x.dim() >= 3 else x.shape[0]
    if layer.kind == "conv2d":
        if (x.shape[0] if x.dim() == 4 else 1) != batch:
            raise _layout_error(name, x, batch, "a Conv2d input must be [B, C, H, W]")
        spatial = tuple(output.shape[-2:])
        return _TokenView("batch_first", batch, _position_mask(name, spatial, batch, mask, x), mask)
    if x.dim() <= 1:
        if batch != 1:
            raise _layout_error(name, x, batch, "a 1-D input holds one example")
        return _TokenView("batch_first", 1, None, mask)
    if x.dim() == 2:
        rows = x.shape[0]
        if rows == batch:
            return _TokenView("batch_first", batch, None, mask)  # one row (token) per example
        if mask is None:
            raise _layout_error(name, x, batch, "its rows are not one per example, and without the task's token "
                                "mask [B, T] they cannot be mapped to examples")
        if rows == mask.numel():  # tokens() brings either order back to [B, T], where the mask applies as it is
            return _TokenView("flat_seq_first" if declared == "seq_first" else "flat", batch, mask, mask)
        if rows == int(mask.sum()):
            return _TokenView("packed", batch, mask, mask)  # the mask still zeroes the padding's bias column
        raise _layout_error(name, x, batch, f"its {rows} rows are neither one per example, nor the {mask.numel()} "
                            f"token positions of the batch, nor its {int(mask.sum())} real tokens")
    first, second = x.shape[0], x.shape[1]
    if declared == "batch_first" or (declared is None and first == batch and second != batch):
        if first != batch:
            raise _layout_error(name, x, batch, "the layer is declared batch-first but its axis 0 is not the batch")
        kind = "batch_first"
    elif declared == "seq_first" or (declared is None and second == batch and first != batch):
        if second != batch:
            raise _layout_error(name, x, batch, "the layer is declared sequence-first but its axis 1 is not the batch")
        kind = "seq_first"
    elif first == second == batch:
        raise _layout_error(name, x, batch, f"axes 0 and 1 both have the batch size ({batch}: sequence length equals "
                            "batch size) and nothing in the model says which is the batch")
    else:
        raise _layout_error(name, x, batch, "neither axis 0 nor axis 1 is the batch")
    positions = tuple(x.shape[2:-1]) if kind == "seq_first" else tuple(x.shape[1:-1])
    if kind == "seq_first":
        positions = (first,) + positions
    return _TokenView(kind, batch, _position_mask(name, positions, batch, mask, x), mask)


def _input_tokens(module: nn.Module, layer: TrackedLayer, view: _TokenView, x: torch.Tensor) -> torch.Tensor:
    """Layer input -> per-token activations ``[B, L, d_in]`` (bias column included), padding zeroed."""
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
        a = view.tokens(x)
    if layer.has_bias:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    return view.apply_mask(a)


def _output_tokens(layer: TrackedLayer, view: _TokenView, g: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the layer output -> per-token ``[B, L, d_out]``, padding zeroed."""
    if layer.kind == "conv2d":
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return view.apply_mask(g.flatten(2).transpose(1, 2))
    return view.apply_mask(view.tokens(g))


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
            cap.next_batch(task.batch_size(batch), task.token_mask(batch))
            loss = task.train_loss(model, batch)
            cap.backward(loss, consume)   # consume(name, a [B, T, d_in], s [B, T, d_out]) per layer

    ``consume`` runs inside the backward pass, as soon as a layer's output gradient is known,
    and the layer's activations are released right after it: only the layers whose gradients
    are still to come are held. With ``on_activation(name, a)`` given, activations are handed
    over during the forward instead and not kept at all (``consume`` then gets ``a=None``).
    Inside either callback, :attr:`token_count` is the number of real (unmasked) tokens in the
    tensors handed over.

    Collecting use (tests, small models)::

        acts, grads = cap.collect(loss)   # dicts name -> [B, T, d_in] / [B, T, d_out]

    Tensors are handed over batch-first whatever the layer's layout (see the module docstring),
    with the token mask applied: padded positions are zero. ``batch_size`` (checked against
    every layer's input) and ``token_mask`` ``[B, T]`` can be given here for a one-batch capture
    or per batch with :meth:`next_batch`; without a batch size, axis 0 is taken as the batch.
    A module called several times in one forward (weight sharing) contributes the
    concatenation of its calls along the token axis. Tensors are given in ``dtype``.

    Inside the context every parameter of the model has ``requires_grad=False`` (restored on
    exit): no parameter gradient is ever needed, and autograd then does not keep each
    layer's input for a weight gradient; the gradient flows from the taps on the tracked
    layers' outputs instead. Parameters' ``.grad`` are never touched. Hooks are removed on exit.
    """

    def __init__(self, model: nn.Module, layers: dict[str, TrackedLayer], dtype: torch.dtype = torch.float32,
                 on_activation=None, batch_size: int | None = None, token_mask: torch.Tensor | None = None):
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
        self._declared = {n: _declared_layout(model, n) for n in layers}
        self._in_backward = False
        self._frozen: list[nn.Parameter] = []
        self.token_count = 0.0
        self.next_batch(batch_size, token_mask)
        self.reset()

    def next_batch(self, batch_size: int | None, token_mask: torch.Tensor | None = None) -> None:
        """Set the batch size and token mask ``[B, T]`` (1 = real token) of the next forward pass."""
        if token_mask is not None:
            if not isinstance(token_mask, torch.Tensor) or token_mask.dim() != 2:
                raise TaskInputError(
                    f"the task's token mask must be a [batch, sequence] tensor, got "
                    f"{tuple(token_mask.shape) if isinstance(token_mask, torch.Tensor) else type(token_mask).__name__}"
                )
            if batch_size is not None and token_mask.shape[0] != batch_size:
                raise TaskInputError(
                    f"the task's token mask has shape {tuple(token_mask.shape)} for a batch of {batch_size} "
                    "examples; it must be [batch, sequence]"
                )
            token_mask = token_mask.detach() != 0
        self._batch_size = batch_size
        self._token_mask = token_mask
        # One device sync per batch, not one per layer: without padding no layer needs a masked copy.
        self._padded = token_mask is not None and not bool(token_mask.all())

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
        self._views: dict[str, list[_TokenView]] = {}
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
            x = inputs[0].detach()
            mask = self._token_mask
            if mask is not None and mask.device != x.device:
                mask = self._token_mask = mask.to(x.device)
            view = _token_view(name, module, layer, x, output, self._batch_size, mask, self._declared[name])
            if not self._padded:
                view.mask = None  # the layout is checked against the mask, but there is nothing to zero or discount
            a = _input_tokens(module, layer, view, x)
            if self.on_activation is not None:
                self.token_count = view.count(a.shape[1])
                self.on_activation(name, a.to(self.dtype))
                a = None
            calls = self._inputs.setdefault(name, [])
            index = len(calls)
            calls.append(a)
            self._shapes.setdefault(name, []).append((output.shape, output.device))
            self._views.setdefault(name, []).append(view)
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
        got[index] = _output_tokens(self.layers[name], self._views[name][index], grad.detach())
        if len(got) == len(self._inputs[name]):
            self._finish(name)

    def _finish(self, name: str) -> None:
        """Hand a layer whose every call has its gradient to the consumer, then drop its tensors."""
        calls = self._inputs.pop(name)
        got = self._grads.pop(name, {})
        views = self._views[name]
        grads = []
        for i, (shape, device) in enumerate(self._shapes[name]):
            g = got.get(i)
            if g is None:  # this call's output did not reach the loss: zero gradient
                g = _output_tokens(self.layers[name], views[i], torch.zeros(shape, dtype=self.dtype, device=device))
            grads.append(g.to(self.dtype))
        self.token_count = sum(v.count(g.shape[1]) for v, g in zip(views, grads))
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


def per_example_gradients(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``DW_b = sum_t s_bt a_bt^T`` for every example: ``[B, d_out, d_in]``."""
    return grads.transpose(1, 2) @ acts


# Per-example gradients are formed this many elements at a time where only a sum over the examples is
# kept: 64 MiB in float32, so a 32000 x 512 head never holds a batch of them at once (8 would be 0.5 GiB).
PER_EXAMPLE_CHUNK_ELEMENTS = 1 << 24


def per_example_chunk(batch: int, d_out: int, d_in: int) -> int:
    """How many examples' ``[d_out, d_in]`` gradients :func:`squared_per_example_sum` forms at once."""
    return max(1, min(batch, PER_EXAMPLE_CHUNK_ELEMENTS // max(1, d_out * d_in)))


def squared_per_example_sum(acts: torch.Tensor, grads: torch.Tensor, transform=None) -> torch.Tensor:
    """``sum_b transform(DW_b)^2`` (elementwise), forming the per-example gradients ``DW_b`` a few examples
    at a time (:func:`per_example_chunk`): the same numbers as ``transform(per_example_gradients(a, s))
    .square().sum(0)`` without the ``[B, d_out, d_in]`` tensor."""
    step = per_example_chunk(acts.shape[0], grads.shape[-1], acts.shape[-1])
    total = None
    for start in range(0, acts.shape[0], step):
        dw = per_example_gradients(acts[start:start + step], grads[start:start + step])
        if transform is not None:
            dw = transform(dw)
        part = dw.square_().sum(0)
        total = part if total is None else total.add_(part)
        del dw
    return total


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
