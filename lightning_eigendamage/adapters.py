"""One adapter per prunable layer type: everything that depends on the module's type.

An adapter knows, for its module type, the widths, the static reasons not to prune it, where it
runs (:class:`~lightning_eigendamage.costs.Geometry`), its K-FAC factor contributions (the
channel form of ``A`` with its count map for convolutions), how to build a stage of the pruned
layer (a rotation or the core), and the per-example input shape at another width (for timing).
Every other module of the package asks :func:`adapter_for` and never which type a layer is.

Registered: ``nn.Conv2d`` (``"conv2d"``), ``nn.Linear`` (``"linear"``) and ``nn.Conv1d``
(``"conv1d"``). Registration is by exact type: a subclass may change ``forward`` and is skipped.
Adding a layer type is one :class:`LayerAdapter` subclass and one :func:`register` call (see
``docs/architecture.md``).

Weights are handled through their 3-d view ``(C_out, k², C_in)`` (``eigenbasis.weight_as_3d``),
which depends only on the weight's dimensions, so the rotation into the eigenbasis, the surgery
and the optimizer transplant are the same code for every type.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .costs import Geometry
from .curvature import conv_channel_a, conv_patch_a, conv_patches, linear_a, output_g


class LayerAdapter:
    """How one module type is pruned. Subclasses set ``kind`` and ``module_type``."""

    kind: str = ""
    module_type: type[nn.Module] = nn.Module
    # whether a_factor takes columns=(every, first) (KFACapture(a_columns=...)): a conv's patch form
    thins_columns: bool = False

    def widths(self, module: nn.Module) -> tuple[int, int]:
        """``(C_in, C_out)``."""
        raise NotImplementedError

    def skip_reason(self, module: nn.Module) -> str | None:
        """Why a module of this type cannot be pruned whatever the model (None: it can)."""
        return None

    def geometry(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> Geometry:
        """Input/output locations and kernel offsets per example, from one forward call."""
        raise NotImplementedError

    def a_factor(
        self, module: nn.Module, x: torch.Tensor, output: torch.Tensor, a_form: str, cache: dict
    ) -> tuple[torch.Tensor, int]:
        """``(Σ a aᵀ, rows)`` of one batch's input ``x``: ``(d_A, d_A)`` and the rows summed.

        An adapter with :attr:`thins_columns` also takes ``columns=(every, first)``: the
        patch-form sum over output columns ``first, first + every, …`` only."""
        raise NotImplementedError

    def a_width(self, module: nn.Module, a_form: str) -> int:
        """``d_A``: the width of ``A`` (``C_in``, or ``C_in·k²`` for the patch form)."""
        return self.widths(module)[0]

    def g_factor(self, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(Σ D Dᵀ, rows)`` of one batch's output gradient: ``(C_out, C_out)`` and the rows."""
        raise NotImplementedError

    def stage(self, template: nn.Module, c_in: int, c_out: int, *, pointwise: bool, bias: bool) -> nn.Module:
        """A new module of this type on ``template``'s device and dtype, ``c_in → c_out``.

        ``pointwise=True``: a rotation stage (1×1, stride 1, unpadded for convolutions); else the
        core, with ``template``'s kernel, stride, padding, dilation and padding mode.
        """
        raise NotImplementedError

    def input_shape_at(self, shape: tuple[int, ...], c_in: int) -> tuple[int, ...]:
        """A per-example input shape (as captured) with its channel width set to ``c_in``."""
        raise NotImplementedError

    def patches(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What one output row of ``module`` reads, ``(rows, C_in·k²)`` in
        ``weight.reshape(C_out, -1)`` column order, one row per example and output location."""
        raise NotImplementedError

    def output_rows(self, y: torch.Tensor) -> torch.Tensor:
        """An output ``(N, C_out, *spatial)`` or ``(N, *, C_out)`` as rows ``(rows, C_out)``, in the
        order of :meth:`patches`."""
        raise NotImplementedError


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on inputs ``(N, *, C_in)``: every leading position is a location."""

    kind = "linear"
    module_type = nn.Linear

    def widths(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def geometry(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> Geometry:
        loc = x[0].numel() // x.shape[-1]
        return Geometry(module.in_features, module.out_features, loc, loc, 1)

    def a_factor(
        self, module: nn.Module, x: torch.Tensor, output: torch.Tensor, a_form: str, cache: dict
    ) -> tuple[torch.Tensor, int]:
        return linear_a(x)

    def g_factor(self, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        return output_g(grad, False)

    def stage(self, template: nn.Module, c_in: int, c_out: int, *, pointwise: bool, bias: bool) -> nn.Module:
        w = template.weight
        return nn.Linear(c_in, c_out, bias=bias, device=w.device, dtype=w.dtype)

    def input_shape_at(self, shape: tuple[int, ...], c_in: int) -> tuple[int, ...]:
        return tuple(shape[:-1]) + (c_in,)

    def patches(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(-1, y.shape[-1])


# The reason a depthwise conv has no K-FAC factors of its own (one filter per channel: nothing
# to rotate, and no input channel its output could be refitted from). The channel engine still
# narrows one with the channels of its group (see channels.engine).
DEPTHWISE = "depthwise convolution"


@dataclass(frozen=True)
class ConvView:
    """A convolution's settings as 2-d tuples (what the conv factor maths reads).

    A Conv1d of kernel ``k`` is the 2-d convolution of kernel ``(1, k)`` over inputs
    ``(N, C, 1, L)``: its factors are the Conv2d ones of that view.
    """

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: Any  # (ph, pw), or "same" / "valid"
    padding_mode: str


class ConvAdapter(LayerAdapter):
    """``nn.Conv2d`` (and, through :class:`Conv1dAdapter`, ``nn.Conv1d``), ``groups=1``."""

    kind = "conv2d"
    module_type = nn.Conv2d
    thins_columns = True

    def widths(self, module: nn.Module) -> tuple[int, int]:
        return module.in_channels, module.out_channels

    def skip_reason(self, module: nn.Module) -> str | None:
        if module.groups > 1:
            if module.groups == module.in_channels:
                return DEPTHWISE
            return f"grouped convolution (groups={module.groups})"
        return None

    def view(self, module: nn.Module) -> Any:
        """The module as the 2-d conv factor maths sees it (a Conv2d is its own view)."""
        return module

    def as_2d(self, t: torch.Tensor) -> torch.Tensor:
        """An activation ``(N, C, *spatial)`` as ``(N, C, H, W)``."""
        return t

    def geometry(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> Geometry:
        c_in, c_out = self.widths(module)
        loc_in, loc_out = math.prod(x.shape[2:]), math.prod(output.shape[2:])
        return Geometry(c_in, c_out, loc_in, loc_out, math.prod(module.kernel_size))

    def a_factor(
        self,
        module: nn.Module,
        x: torch.Tensor,
        output: torch.Tensor,
        a_form: str,
        cache: dict,
        columns: tuple[int, int] = (1, 0),
    ) -> tuple[torch.Tensor, int]:
        x2, out2 = self.as_2d(x), self.as_2d(output)
        if a_form == "channel":
            return conv_channel_a(x2, self.view(module), out2.shape[2], out2.shape[3], cache)
        every, first = columns
        if out2.shape[3] < every:  # a map narrower than the step is read whole
            every, first = 1, 0
        return conv_patch_a(x2, self.view(module), (every, first % every))

    def a_width(self, module: nn.Module, a_form: str) -> int:
        c_in = module.in_channels
        return c_in * math.prod(module.kernel_size) if a_form == "patch" else c_in

    def g_factor(self, grad: torch.Tensor) -> tuple[torch.Tensor, int]:
        return output_g(grad, True)

    def stage(self, template: nn.Module, c_in: int, c_out: int, *, pointwise: bool, bias: bool) -> nn.Module:
        w = template.weight
        kw = {"device": w.device, "dtype": w.dtype, "bias": bias}
        cls = type(template)
        if pointwise:
            return cls(c_in, c_out, 1, **kw)
        return cls(
            c_in,
            c_out,
            template.kernel_size,
            stride=template.stride,
            padding=template.padding,
            dilation=template.dilation,
            groups=1,
            padding_mode=template.padding_mode,
            **kw,
        )

    def input_shape_at(self, shape: tuple[int, ...], c_in: int) -> tuple[int, ...]:
        return (c_in,) + tuple(shape[1:])

    def patches(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        p = conv_patches(self.as_2d(x), self.view(module))  # (N, C_in·k², T)
        return p.transpose(1, 2).reshape(-1, p.shape[1])

    def output_rows(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(y.shape[0], y.shape[1], -1).transpose(1, 2).reshape(-1, y.shape[1])


class Conv1dAdapter(ConvAdapter):
    """``nn.Conv1d`` on ``(N, C, L)``: the Conv2d maths on the ``(1, k)`` view (:class:`ConvView`)."""

    kind = "conv1d"
    module_type = nn.Conv1d

    def __init__(self) -> None:
        # One view per module, alive as long as it is: the count-map cache is keyed by its id.
        self._views: weakref.WeakKeyDictionary[nn.Module, ConvView] = weakref.WeakKeyDictionary()

    def view(self, module: nn.Module) -> ConvView:
        v = self._views.get(module)
        if v is None:
            pad = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
            k, s, d = module.kernel_size[0], module.stride[0], module.dilation[0]
            v = self._views[module] = ConvView((1, k), (1, s), (1, d), pad, module.padding_mode)
        return v

    def as_2d(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(2)


_REGISTRY: dict[type[nn.Module], LayerAdapter] = {}


# what the base LayerAdapter leaves to each adapter (its versions raise NotImplementedError)
_REQUIRED = ("widths", "geometry", "a_factor", "g_factor", "stage", "input_shape_at")


def register(adapter: LayerAdapter) -> LayerAdapter:
    """Make ``adapter.module_type`` prunable (exact type; replaces an earlier registration).

    Raises:
        TypeError: ``adapter`` is not a :class:`LayerAdapter`, its ``module_type`` is not a
            subclass of ``nn.Module`` (``nn.Module`` itself would match every module), or it
            leaves one of the methods every adapter needs to the base class.
        ValueError: no ``kind``, or another module type is registered under it.
    """
    if not isinstance(adapter, LayerAdapter):
        raise TypeError(f"register() takes a LayerAdapter instance, got {type(adapter).__name__}")
    mt = adapter.module_type
    if not (isinstance(mt, type) and issubclass(mt, nn.Module)) or mt is nn.Module:
        raise TypeError(f"adapter.module_type must be an nn.Module subclass (not nn.Module), got {mt!r}")
    if not isinstance(adapter.kind, str) or not adapter.kind:
        raise ValueError(f"an adapter needs a kind (a non-empty string), got {adapter.kind!r}")
    if any(a.kind == adapter.kind and t is not adapter.module_type for t, a in _REGISTRY.items()):
        raise ValueError(f"another module type is registered as {adapter.kind!r}")
    missing = [n for n in _REQUIRED if getattr(type(adapter), n) is getattr(LayerAdapter, n)]
    if missing:
        name = type(adapter).__name__
        raise TypeError(f"{name} must implement {', '.join(missing)} (LayerAdapter's versions raise)")
    _REGISTRY[adapter.module_type] = adapter
    return adapter


def adapter_for(module: nn.Module, *, exact: bool = True) -> LayerAdapter | None:
    """The adapter of ``module``'s exact type (or, with ``exact=False``, of the nearest registered
    type it derives from, for reading widths and factors), or None."""
    if exact:
        return _REGISTRY.get(type(module))
    return next((_REGISTRY[t] for t in type(module).__mro__ if t in _REGISTRY), None)


def adapter_of_kind(kind: str) -> LayerAdapter | None:
    """The adapter registered under ``kind`` (as stored in pruned-layer records), or None."""
    return next((a for a in _REGISTRY.values() if a.kind == kind), None)


def registered_base(module: nn.Module) -> type[nn.Module] | None:
    """The registered type ``module`` is an instance of (exactly or as a subclass), or None."""
    return next((t for t in _REGISTRY if isinstance(module, t)), None)


def registered_names() -> str:
    """``"nn.Conv2d or nn.Linear or nn.Conv1d"``: for messages."""
    return " or ".join(f"nn.{t.__name__}" for t in _REGISTRY)


register(ConvAdapter())
register(LinearAdapter())
register(Conv1dAdapter())
