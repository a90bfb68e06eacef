"""Hook-based capture: the lifecycle shared by every capture, and the K-FAC capture.

:class:`HookCapture` owns what any per-layer capture needs (forward hooks on, off on exit, a batch
begun, aborted or committed only if finite, calls per forward pass counted, the order layers first
ran in); :class:`KFACapture` records the K-FAC factors of :mod:`.factors`, and
:class:`~lightning_eigendamage.baselines.DiagFisherCapture` the diagonal Fisher, on top of it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import nn

from ..attention import route_out_projection
from ..costs import Geometry
from .factors import A_FORMS, compute_dtype

# Set on the forward hooks a capture installs, so that layer discovery can tell them from a
# user's hooks (which a rebuilt layer would lose) while a capture is open.
CAPTURE_HOOK = "_lightning_eigendamage_capture"


def is_capture_hook(fn: Any) -> bool:
    """Whether ``fn`` (a value of a module's hook dicts) was installed by a capture of this package."""
    return bool(getattr(fn, CAPTURE_HOOK, False))


_C = TypeVar("_C", bound="HookCapture")


def holds_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is, or holds, a ``torch.compile``'d module (an ``OptimizedModule``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) for m in model.modules())


@contextlib.contextmanager
def compiled_code_sees_hooks(model: nn.Module) -> Iterator[None]:
    """While inside, the ``torch.compile``'d modules of ``model`` call the forward hooks registered
    on their layers, whenever those are added or removed. By default torch's compiler does not
    guard on module hooks: code compiled before a hook was registered never calls it, so a
    capture saw no layer run (a Lightning sanity check had compiled the network first). Inside,
    it guards on them (``torch._dynamo.config.skip_nnmodule_hook_guards = False``: a changed set
    of hooks recompiles), and code compiled before is dropped (``torch.compiler.reset()``); the
    setting is put back on exit. A model without compiled modules is left alone."""
    if not holds_compiled(model):
        yield
        return
    config = torch._dynamo.config
    before = config.skip_nnmodule_hook_guards
    config.skip_nnmodule_hook_guards = False
    torch.compiler.reset()
    try:
        yield
    finally:
        config.skip_nnmodule_hook_guards = before


class HookCapture:
    """Forward hooks on ``modules`` and the per-batch lifecycle of what they record.

    Use as a context manager; hooks are removed on exit, also on exceptions. Between
    :meth:`begin_batch` and :meth:`end_batch` (or :meth:`abort_batch`) each forward call of a
    module is counted; the first one per pass of a module in ``factors_for`` is handed to
    :meth:`record`, which stores the layer's contribution as *pending* (and may watch the output's
    gradient with :meth:`watch_grad`). Every other call (a module run twice, or one outside
    ``factors_for``) only counts and drops what is pending. :meth:`end_batch` commits the batch
    only if every pending tensor is finite. The hooks are never traced by ``torch.compile``.

    A subclass sets :attr:`layer_type` (a class whose instances have ``max_calls``, ``fired`` and
    ``reached`` attributes) and implements :meth:`record`, :meth:`pending_values`,
    :meth:`clear_pending` and :meth:`commit`.

    Attributes:
        modules: name → hooked module. factors_for: names whose contributions are recorded.
        routes: hooked module → the module that calls it functionally (an
            ``nn.MultiheadAttention``'s ``out_proj``:
            :func:`~lightning_eigendamage.attention.functional_owners`, restricted to the
            modules to capture): while the hooks are in, each of them runs as a module
            (:func:`~lightning_eigendamage.attention.route_out_projection`), so its hooks fire.
        layers: name → ``layer_type`` record. fire_order: names in the order they first ran.
        grad_scale: factor applied to output gradients (undoes a batch-mean loss; ``N`` for it).
        batches / skipped_batches: batches committed / dropped as non-finite.
    """

    layer_type: type  # set by each subclass

    def __init__(
        self,
        modules: dict[str, nn.Module],
        *,
        factors_for: Iterable[str] | None = None,
        accum_dtype: torch.dtype = torch.float64,
        routes: dict[nn.Module, nn.Module] | None = None,
    ) -> None:
        self.modules = dict(modules)
        self.routes = dict(routes or {})
        self.factors_for = set(self.modules if factors_for is None else factors_for)
        self.accum_dtype = accum_dtype
        self.layers: dict[str, Any] = {name: self.layer_type() for name in self.modules}
        self.fire_order: list[str] = []
        self.grad_scale = 1.0
        self.batches = 0
        self.skipped_batches = 0
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}
        self._active = False

    # -- what a subclass records ------------------------------------------------------------------
    def record(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        """Store the pending contribution of ``name``'s first call in this pass (subclass)."""
        raise NotImplementedError

    def pending_values(self, layer: Any) -> list[torch.Tensor]:
        """The tensors ``layer`` has pending, checked for finiteness; empty if none (subclass)."""
        raise NotImplementedError

    def clear_pending(self, layer: Any) -> None:
        """Drop what ``layer`` has pending, with any references to the batch's tensors (subclass)."""
        raise NotImplementedError

    def commit(self, layer: Any, n_examples: int) -> None:
        """Add ``layer``'s finite pending contribution of ``n_examples`` to its sums (subclass);
        :meth:`end_batch` clears the pending state afterwards."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        """True between :meth:`begin_batch` and :meth:`end_batch` / :meth:`abort_batch` /
        :meth:`remove`: the hooks record what they see."""
        return self._active

    def calls(self, name: str) -> int:
        """Forward calls of ``name`` so far in the batch being recorded (or the last one)."""
        return self._calls.get(name, 0)

    # -- context management ------------------------------------------------------------------
    def __enter__(self: _C) -> _C:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
            if module in self.routes:  # called functionally: run it as a module
                self._handles.extend(route_out_projection(self.routes[module]))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the forward hooks (gradient hooks die with their outputs) and stop recording."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False

    # -- batches -------------------------------------------------------------------------------
    def begin_batch(self) -> None:
        """Start recording a batch: call counts reset, nothing pending."""
        self._calls = {}
        for layer in self.layers.values():
            self.clear_pending(layer)
        self._active = True

    def abort_batch(self) -> None:
        """Drop the current batch's contributions (e.g. after an exception)."""
        self._active = False
        for layer in self.layers.values():
            self.clear_pending(layer)

    def end_batch(self, n_examples: int) -> bool:
        """Commit the batch's contributions; returns False (and counts it) if any is non-finite."""
        self._active = False
        for name, calls in self._calls.items():
            layer = self.layers[name]
            layer.max_calls = max(layer.max_calls, calls)
        pend = [(layer, values) for layer in self.layers.values() if (values := self.pending_values(layer))]
        checks = [v.sum() for _, values in pend for v in values]
        if checks and not bool(torch.isfinite(torch.stack(checks)).all()):
            self.skipped_batches += 1
            for layer, _ in pend:
                self.clear_pending(layer)
            return False
        for layer, _ in pend:
            self.commit(layer, n_examples)
            self.clear_pending(layer)  # also drops references to this batch's activations
        self.batches += 1
        return True

    # -- hooks -----------------------------------------------------------------------------------
    def watch_grad(self, output: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> None:
        """Call ``hook(grad)`` with the gradient that reaches ``output`` (if it carries one).

        A tensor hook on the output rather than a module backward hook, so in-place ops after the
        layer (``ReLU(inplace=True)``) do not change what is seen; never traced by torch.compile.
        """
        if output.requires_grad:
            output.register_hook(torch.compiler.disable(hook))

    def _forward_hook(self, name: str) -> Callable:
        # Never traced by torch.compile: the hook's Python state (which layer, calls so far,
        # capture on or off) would otherwise become guards and recompile the model every batch.
        @torch.compiler.disable
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not self._active:
                return
            calls = self._calls.get(name, 0) + 1
            self._calls[name] = calls
            layer = self.layers[name]
            if not layer.fired:
                self.fire_order.append(name)
            layer.fired = True
            if calls > 1 or name not in self.factors_for:
                self.clear_pending(layer)
                return
            self.record(name, module, inputs, output)

        setattr(hook, CAPTURE_HOOK, True)
        return hook


@dataclass
class LayerFactors:
    """Accumulated factors of one layer (sums; :meth:`a` / :meth:`g` give the averages)."""

    a_sum: torch.Tensor | None = None
    g_sum: torch.Tensor | None = None
    a_rows: int = 0
    g_rows: int = 0
    examples: float = 0  # examples whose rows entered G (fractional where a layer's rows were thinned)
    geometry: Geometry | None = None
    input_shape: tuple[int, ...] | None = None  # per-example shape of the hooked module's input
    max_calls: int = 0  # most forward calls seen in one pass
    fired: bool = False
    reached: bool = False  # a gradient arrived at least once
    _pending: dict[str, Any] = field(default_factory=dict)

    def a(self) -> torch.Tensor:
        """``A`` ``(d_in, d_in)``: the accumulated sum over its rows."""
        return self.a_sum / self.a_rows

    def g(self) -> torch.Tensor:
        """``G`` ``(C_out, C_out)``: the accumulated sum over its rows."""
        return self.g_sum / self.g_rows

    @property
    def locations(self) -> float:
        """``T``: output locations per example (``H_out·W_out``, tokens, or 1)."""
        return self.g_rows / self.examples if self.examples > 0 else 0.0

    def unusable(self, factors: bool = True) -> str | None:
        """Why these factors cannot score the layer (run more than once per forward pass, never
        run, or no gradient reached it), or None. With ``factors=False`` (a layer hooked only to
        see it run, its factors not computed): whether it ran, at most once per forward pass."""
        if self.max_calls > 1:
            return f"called {self.max_calls} times per forward pass"
        if not factors:
            return None if self.fired else "never called in the forward pass"
        if not self.reached or self.a_rows == 0 or self.g_rows == 0:
            return "never called, or no gradient reached its output"
        return None


@dataclass
class CaptureResult:
    """The factors of a capture: per-layer :class:`LayerFactors`, the order layers first ran in,
    and the batches committed / dropped as non-finite."""

    layers: dict[str, LayerFactors]
    fire_order: list[str]
    batches: int
    skipped_batches: int


def channel_form(
    result: CaptureResult, names: Iterable[str], modules: Mapping[str, nn.Module]
) -> CaptureResult:
    """``result`` (a patch-form capture) with the factors of the convolutions among ``names`` in
    the channel form of ``A``: the sum over kernel offsets of the patch form's diagonal blocks,
    ``A_c = Σ_δ A_p[(·, δ), (·, δ)]`` over ``N·T·k`` reads (``k`` offsets per location), which is
    exactly the channel form's ``Σ_{n,t,δ} a_{tδ} a_{tδ}ᵀ``. Linear layers (and every other
    layer) are shared as they are; ``result`` is not changed."""
    layers = dict(result.layers)
    for name in names:
        module, lf = modules[name], layers[name]
        kernel = getattr(module, "kernel_size", None)
        if kernel is None or lf.a_sum is None:
            continue
        k = math.prod(kernel)
        c = lf.a_sum.shape[0] // k
        a = lf.a_sum.reshape(c, k, c, k).diagonal(dim1=1, dim2=3).sum(-1)
        layers[name] = replace(lf, a_sum=a, a_rows=lf.a_rows * k, _pending={})
    return replace(result, layers=layers)


class KFACapture(HookCapture):
    """Registers hooks that accumulate K-FAC factors for the given modules.

    Use as a context manager; hooks are removed on exit, also on exceptions. Between
    :meth:`begin_batch` and :meth:`end_batch`, each forward call of a module records its ``A``
    contribution, and the gradient that later reaches its output records ``G`` (multiplied by
    ``grad_scale²``, which undoes a mean-reduced loss). :meth:`end_batch` commits the batch only if
    every contribution is finite.

    Args:
        modules: name → module to hook (any type registered in
            :mod:`lightning_eigendamage.adapters`: Conv2d, Conv1d, Linear); the adapter of each
            does the type-specific factor maths.
        factors_for: names whose factors are computed; others only record that they fired.
        a_form: ``"channel"`` or ``"patch"`` (conv ``A``).
        max_examples: at most this many entries along the first dimension of each layer's input
            (the batch's examples) enter that layer's factors per batch: every ``s``-th, with
            ``s = ⌈N / max_examples⌉`` (:meth:`example_step`); None: all. ``A``, ``G`` and ``T``
            are then estimated from those examples (the factor products cost ``1/s`` as much);
            :func:`~lightning_eigendamage.curvature.capture_batch` runs its pass on those
            examples alone where it can slice the batch and the model computes each example on
            its own (checked on the first batch, ``slices``).
        a_columns: with ``a_form="patch"``, a convolution's ``A`` of each batch comes from every
            ``a_columns``-th column of its output map (the first one ``b mod a_columns`` on the
            ``b``-th committed batch, so over ``a_columns`` batches every column is read as often):
            the patch products cost ``1/a_columns`` as much, ``A`` is averaged over the rows read.
            ``G`` is not thinned; a map narrower than ``a_columns`` is read whole.
    """

    layer_type = LayerFactors
    layers: dict[str, LayerFactors]

    def __init__(
        self,
        modules: dict[str, nn.Module],
        *,
        factors_for: Iterable[str] | None = None,
        a_form: str = "channel",
        accum_dtype: torch.dtype = torch.float64,
        routes: dict[nn.Module, nn.Module] | None = None,
        max_examples: int | None = None,
        a_columns: int = 1,
    ) -> None:
        if a_form not in A_FORMS:
            raise ValueError(f"a_form must be one of {A_FORMS}, got {a_form!r}")
        if max_examples is not None and (
            isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
        ):
            raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
        if isinstance(a_columns, bool) or not isinstance(a_columns, int) or a_columns < 1:
            raise ValueError(f"a_columns must be a positive int, got {a_columns!r}")
        super().__init__(modules, factors_for=factors_for, accum_dtype=accum_dtype, routes=routes)
        from ..adapters import adapter_for  # here, not at import: the adapters use factors.py

        self.adapters = {name: adapter_for(m, exact=False) for name, m in self.modules.items()}
        for name in self.factors_for:
            if self.adapters.get(name) is None:
                raise TypeError(
                    f"{name}: no adapter for {type(self.modules[name]).__name__} (not a prunable type)"
                )
        self.a_form = a_form
        self.max_examples = max_examples
        self.a_columns = a_columns
        # whether capture_batch may run its pass on the thinned examples alone (None: not yet
        # checked; it checks on the first batch it could)
        self.slices: bool | None = None
        self._count_cache: dict = {}

    def example_step(self, n: int) -> int:
        """``s``: of a batch of ``n`` examples every ``s``-th feeds the factors (1: all of them)."""
        if self.max_examples is None or n <= self.max_examples:
            return 1
        return -(-n // self.max_examples)

    @property
    def pending_examples(self) -> int:
        """``N`` of the batch in progress (as seen by the first recorded layer), 0 if none."""
        return next((lf._pending["n"] for lf in self.layers.values() if "n" in lf._pending), 0)

    def result(self) -> CaptureResult:
        """The factors accumulated so far (the tensors are shared, not copied)."""
        return CaptureResult(self.layers, list(self.fire_order), self.batches, self.skipped_batches)

    def grad_targets(self, root: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Tensors a backward must reach for every recorded layer's output hook to fire.

        ``root`` (the model input, made to carry a gradient) first; then, in the order the layers
        ran, a layer's input only if no earlier target is upstream of it in the autograd graph
        (e.g. for a plain CNN only ``root``), or its weight if the input carries no gradient. No
        weight gradient is computed for layers reached through their inputs, and the gradients
        ``torch.autograd.grad`` returns (one per target, each the size of its tensor) stay few.
        """
        chosen: list[torch.Tensor] = []
        nodes: set = set()  # autograd nodes of the non-leaf targets
        leaves: set[int] = set()  # ids of the leaf targets
        not_reaching: set = set()  # nodes known not to lead to any target (reset on each new one)

        def covered(t: torch.Tensor) -> bool:
            if t.grad_fn is None:
                return id(t) in leaves
            stack, seen = [t.grad_fn], set()
            while stack:
                node = stack.pop()
                if node in nodes:
                    return True
                var = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
                if var is not None and id(var) in leaves:
                    return True
                if node in seen or node in not_reaching:
                    continue
                seen.add(node)
                stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
            not_reaching.update(seen)
            return False

        def add(t: torch.Tensor) -> None:
            chosen.append(t)
            if t.grad_fn is None:
                leaves.add(id(t))
            else:
                nodes.add(t.grad_fn)
            not_reaching.clear()

        if root is not None and root.requires_grad:
            add(root)
        order = [n for n in self.fire_order if n in self.factors_for]
        order += [n for n in self.factors_for if n not in order]
        for name in order:
            t = self.layers[name]._pending.get("grad_target")
            if t is not None and t.requires_grad and not covered(t):
                add(t)
        return chosen

    # -- what is recorded and committed ----------------------------------------------------------
    def pending_values(self, layer: LayerFactors) -> list[torch.Tensor]:
        # The diagonals: A and G are Grams Σ v vᵀ, so |A_ij| ≤ √(A_ii·A_jj) and an entry that is not
        # finite (a NaN or inf in v, or an overflow) makes one on the diagonal so; reading d
        # entries, not d² (a patch-form A of a wide conv is (9·C_in)², as large as the step's work).
        return [layer._pending[k].diagonal() for k in ("a", "g") if k in layer._pending]

    def clear_pending(self, layer: LayerFactors) -> None:
        layer._pending = {}

    def commit(self, layer: LayerFactors, n_examples: int) -> None:
        p = layer._pending
        if "a" not in p or "g" not in p:
            return
        # in place: a fresh d×d sum every batch costs its allocation (page faults) on wide layers
        # A as computed (float32 for float32 models): added into the accum_dtype sum in place, no
        # converted copy of a (9·C_in)² patch form per batch
        layer.a_sum = p["a"].to(self.accum_dtype) if layer.a_sum is None else layer.a_sum.add_(p["a"])
        layer.g_sum = p["g"] if layer.g_sum is None else layer.g_sum.add_(p["g"])
        layer.a_rows += p["a_rows"]
        layer.g_rows += p["g_rows"]
        layer.examples += n_examples * p["kept"]

    def record(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        lf = self.layers[name]
        adapter = self.adapters[name]
        x = inputs[0].detach()
        n = x.shape[0]
        if lf.geometry is None:
            lf.geometry = adapter.geometry(module, x, output)
            lf.input_shape = tuple(x.shape[1:])
        step = self.example_step(n)
        xs, outs = (x, output) if step == 1 else (x[::step], output[::step])
        xc = xs.to(compute_dtype(x.dtype))
        # Inside a training step under autocast the products below would run in bf16/fp16
        # (fp16 overflows on large sums): factors are always computed in float32 or better.
        with _autocast_off(x.device):
            if self.a_columns > 1 and self.a_form == "patch" and adapter.thins_columns:
                columns = (self.a_columns, self.batches % self.a_columns)
                a, rows = adapter.a_factor(module, xc, outs, self.a_form, self._count_cache, columns=columns)
            else:
                a, rows = adapter.a_factor(module, xc, outs, self.a_form, self._count_cache)
        # kept: the share of the batch whose rows enter the factors (T = g_rows / examples)
        lf._pending = {"a": a, "a_rows": rows, "n": n, "step": step}
        lf._pending["kept"] = xs.shape[0] / n
        # Where a backward must reach for this layer's output hook to fire: its input if that
        # carries a gradient (no weight gradient is then computed), else its weight.
        live = inputs[0]
        lf._pending["grad_target"] = live if live.requires_grad else module.weight
        self.watch_grad(output, self._grad_hook(name, adapter))

    def _grad_hook(self, name: str, adapter: Any) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            lf = self.layers[name]
            # The layer's input is no longer needed as a backward target: let it be freed as soon
            # as autograd is done with it, as it would be without capture (holding every layer's
            # input to the end of the backward grows the heap on every step: page faults).
            lf._pending.pop("grad_target", None)
            if not self.recording or "a" not in lf._pending:
                return
            step = lf._pending["step"]
            grad = grad.detach() if step == 1 else grad.detach()[::step]
            with _autocast_off(grad.device):
                g, rows = adapter.g_factor(grad.to(compute_dtype(grad.dtype)))
            scale = float(self.grad_scale) ** 2
            lf._pending["g"] = g.to(self.accum_dtype) * scale
            lf._pending["g_rows"] = rows
            lf.reached = True

        return hook

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The factors accumulated so far as plain data (CPU tensors, numbers, strings, lists), so
        a checkpoint written inside a capture window loads with ``torch.load(weights_only=True)``.

        Sums are copied exactly (``accum_dtype``); a batch in progress is not included.
        """

        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to("cpu", copy=True)

        layers = {}
        for name, lf in self.layers.items():
            geo = lf.geometry
            layers[name] = {
                "a_sum": cpu(lf.a_sum),
                "g_sum": cpu(lf.g_sum),
                "a_rows": lf.a_rows,
                "g_rows": lf.g_rows,
                "examples": lf.examples,
                "geometry": None if geo is None else [geo.c_in, geo.c_out, geo.loc_in, geo.loc_out, geo.k2],
                "input_shape": None if lf.input_shape is None else list(lf.input_shape),
                "max_calls": lf.max_calls,
                "fired": lf.fired,
                "reached": lf.reached,
            }
        return {
            "a_form": self.a_form,
            "layers": layers,
            "fire_order": list(self.fire_order),
            "batches": self.batches,
            "skipped_batches": self.skipped_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s output (factors moved to each module's device).

        Raises:
            ValueError: the state is for other layers, another ``a_form`` or other widths; the
                capture is then left unchanged.
        """
        layers = state.get("layers") if isinstance(state, dict) else None
        if not isinstance(layers, dict) or set(layers) != set(self.layers):
            theirs = sorted(layers) if isinstance(layers, dict) else layers
            raise ValueError(f"saved factors are for layers {theirs}, this capture has {sorted(self.layers)}")
        if state.get("a_form") != self.a_form:
            raise ValueError(
                f"saved factors have a_form {state.get('a_form')!r}, this capture {self.a_form!r}"
            )
        new = {}
        for name, entry in layers.items():
            module, adapter = self.modules[name], self.adapters[name]
            d_in, d_out = adapter.a_width(module, self.a_form), adapter.widths(module)[1]
            dev = module.weight.device
            sums = {}
            for key, d in (("a_sum", d_in), ("g_sum", d_out)):
                t = entry[key]
                if t is not None and tuple(t.shape) != (d, d):
                    raise ValueError(
                        f"saved {key} of {name!r} is {tuple(t.shape)}, the layer needs ({d}, {d})"
                    )
                # a copy: later batches add to the sums in place, not to the caller's state
                sums[key] = None if t is None else t.to(dev, self.accum_dtype, copy=True)
            geo = entry["geometry"]
            new[name] = LayerFactors(
                a_sum=sums["a_sum"],
                g_sum=sums["g_sum"],
                a_rows=int(entry["a_rows"]),
                g_rows=int(entry["g_rows"]),
                examples=float(entry["examples"]),
                geometry=None if geo is None else Geometry(*(int(v) for v in geo)),
                input_shape=None if entry["input_shape"] is None else tuple(entry["input_shape"]),
                max_calls=int(entry["max_calls"]),
                fired=bool(entry["fired"]),
                reached=bool(entry["reached"]),
            )
        self.layers = new
        self.fire_order = [str(n) for n in state["fire_order"]]
        self.batches = int(state["batches"])
        self.skipped_batches = int(state["skipped_batches"])


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast for ``device``'s type (a no-op where autocast is unknown)."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()
