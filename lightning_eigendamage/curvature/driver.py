"""Driving a model over batches: batch and loss helpers, one captured batch, the batch loop.

:func:`capture_batch` runs one forward and backward that feeds a capture whose hooks are on;
:func:`drive_capture` runs it over batches in eval mode with the hooks on only inside the call;
:func:`capture_factors` is the K-FAC capture over batches.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import functional_owners
from ..nested import map_tensors, tensors_in
from ..report import PruningWarning
from .hooks import CaptureResult, HookCapture, KFACapture

if TYPE_CHECKING:
    from typing_extensions import Unpack

FISHER_TYPES = ("true", "empirical")
LIKELIHOODS = ("categorical", "bernoulli", "gaussian")


class CaptureOptions(TypedDict, total=False):
    """The keyword options of :func:`drive_capture` that the ``capture_*`` functions pass on:
    which Fisher, how the loss and input are read from a batch, how many batches."""

    fisher: str
    loss_fn: Callable | None
    input_fn: Callable | None
    likelihood: str
    class_dim: int
    generator: torch.Generator | None
    max_batches: int | None
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None


def split_batch(batch: Any, input_fn: Callable | None) -> tuple[Any, Any]:
    """``(input, target)`` of a batch: a tensor, an ``(input, target, ...)`` tuple, or via
    ``input_fn`` (the target then as :func:`target_of` finds it)."""
    if input_fn is not None:
        return input_fn(batch), target_of(batch)
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        f"cannot find the model input in a batch of type {type(batch).__name__}; pass "
        "input_fn=lambda batch: ... that returns the model's input"
    )


def target_of(batch: Any) -> Any:
    """The target of an ``(input, target, ...)`` batch; for a dict batch the whole dict (a
    ``loss_fn`` reads its labels from it); None for any other batch."""
    if isinstance(batch, Mapping):
        return batch
    return batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (also inside tuples, lists and dicts) moved to ``device``."""
    return map_tensors(lambda t: t.to(device, non_blocking=True), obj)


def check_categorical(output: Any, class_dim: int) -> None:
    """ValueError if ``output`` is a tensor with a single logit on ``class_dim``: a softmax over
    one class is constant, so a categorical likelihood (or cross-entropy) gives zero curvature.
    A :class:`~lightning_eigendamage.PruningWarning` if a 4-d output ``(N, C, H, W)`` would have
    its width taken as the classes (``class_dim=-1``)."""
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        return
    if not -output.dim() <= class_dim < output.dim():
        raise ValueError(
            f"class_dim={class_dim} is out of range for the model's output of shape "
            f"{tuple(output.shape)}: pass the dimension that holds the classes' logits"
        )
    if output.dim() == 4 and class_dim in (-1, 3):
        warnings.warn(
            f"the model's output {tuple(output.shape)} looks like per-location logits (N, C, H, W), "
            f"but class_dim={class_dim} takes its last dimension ({output.shape[-1]}) as the classes: "
            "for segmentation-style outputs pass class_dim=1",
            PruningWarning,
            stacklevel=3,
        )
    if output.movedim(class_dim, -1).shape[-1] == 1:
        raise ValueError(
            f"the model's output {tuple(output.shape)} has a single logit on class_dim={class_dim}: a "
            "softmax over one class is constant, so every gradient and all curvature would be zero. "
            "For a sigmoid output (binary or multi-label) pass likelihood='bernoulli', for regression "
            "likelihood='gaussian', or fisher='empirical' with your own loss_fn"
        )


def default_loss(output: torch.Tensor, target: torch.Tensor, class_dim: int = -1) -> torch.Tensor:
    """Cross-entropy summed over locations, averaged over the ``N`` examples (leading dim)."""
    check_categorical(output, class_dim)
    logits = output.movedim(class_dim, -1)
    flat = logits.reshape(-1, logits.shape[-1])
    if not target.is_floating_point() and target.numel() != flat.shape[0]:  # class indices
        raise ValueError(
            f"the empirical Fisher's cross-entropy: the model's output {tuple(output.shape)} has "
            f"{flat.shape[0]} rows of {flat.shape[1]} logits on class_dim={class_dim}, the target "
            f"{tuple(target.shape)} has {target.numel()} labels; pass the class_dim of the output "
            "(1 for (N, C, H, W)) or a loss_fn of your own"
        )
    return F.cross_entropy(flat.float(), target.reshape(-1), reduction="sum") / output.shape[0]


def sampled_loss(
    output: torch.Tensor, likelihood: str, class_dim: int, generator: torch.Generator
) -> torch.Tensor:
    """Loss of targets drawn from the model's own predictive distribution, summed over examples.

    Categorical: ``ŷ ~ softmax(logits)`` along ``class_dim``; loss ``Σ −log p(ŷ)``.
    Bernoulli (each output a logit of its own, e.g. a binary classifier's single logit or a
    multi-label head): ``ŷ ~ Bernoulli(σ(z))`` elementwise; loss ``Σ BCE(z, ŷ)``, whose gradient
    ``σ(z) − ŷ`` has second moment ``σ(1 − σ)``.
    Gaussian (unit variance): ``ŷ = output + ε``, loss ``½ Σ (ŷ − output)²``.
    Its gradient w.r.t. a layer output is the per-example ``D`` of the true Fisher.
    """
    if likelihood == "categorical":
        check_categorical(output, class_dim)
        logits = output.movedim(class_dim, -1)
        flat = logits.reshape(-1, logits.shape[-1]).float()
        with torch.no_grad():
            probs = torch.softmax(flat, dim=-1)
            # Non-finite logits: sample anything; the batch's factors are non-finite and dropped.
            bad = ~torch.isfinite(probs).all(dim=-1, keepdim=True)
            probs = torch.where(bad, torch.ones_like(probs), probs)
            y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return F.cross_entropy(flat, y, reduction="sum")
    if likelihood == "bernoulli":
        z = output.float()
        with torch.no_grad():
            p = torch.sigmoid(z)
            p = torch.where(torch.isfinite(p), p, torch.full_like(p, 0.5))  # non-finite: dropped later
            y = torch.bernoulli(p, generator=generator)
        return F.binary_cross_entropy_with_logits(z, y, reduction="sum")
    with torch.no_grad():
        eps = torch.randn(output.shape, generator=generator, device=output.device, dtype=torch.float32)
        y = output.detach().float() + eps
    return 0.5 * ((y - output.float()) ** 2).sum()


def capture_batch(
    model: nn.Module,
    cap: HookCapture,
    inp: Any,
    target: Any,
    *,
    fisher: str = "true",
    loss_fn: Callable | None = None,
    likelihood: str = "categorical",
    class_dim: int = -1,
    generator: torch.Generator | None = None,
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> bool:
    """One forward and backward of ``model`` on ``inp`` that feeds ``cap`` (hooks already on).

    The forward is ``model(inp)``, or ``forward_fn(model, inp)`` when given (then ``inp`` is the
    whole batch, for models whose ``forward`` takes more than one input).

    The caller chooses the model's mode (eval mode keeps BatchNorm statistics and dropout RNG
    untouched). The backward goes through :func:`torch.autograd.grad` to the hooked layers'
    *inputs* (a floating-point model input is made to carry a gradient for this), so no weight
    gradient is computed and ``.grad`` is never written; a layer whose input carries no gradient
    (e.g. after a frozen stem) is reached through its weight instead. Returns whether the batch
    was committed (finite). Where ``cap`` takes its factors from every ``s``-th example
    (``KFACapture(max_examples=...)``) and the model is in eval mode, a tensor input runs as those
    examples alone.

    - ``fisher="true"``: targets are sampled from the model (:func:`sampled_loss`) with
      ``generator``; the global RNG is not used.
    - ``fisher="empirical"``: ``loss_fn(output, target)`` (default :func:`default_loss`), which
      must return the loss averaged over the batch's ``N`` examples; it is multiplied by ``N``.
      With a ``loss_fn`` the output may be anything it takes (a tuple of heads): ``N`` is the
      first dimension of its first tensor.
    """
    inp, target, check = _thinned(model, cap, inp, target, forward_fn)
    if isinstance(inp, torch.Tensor) and inp.is_floating_point() and not inp.requires_grad:
        # A non-leaf alias that requires grad: the backward can stop at the first layer's input.
        inp = inp.detach() + torch.zeros((), dtype=inp.dtype, device=inp.device, requires_grad=True)
    cap.begin_batch()
    try:
        with torch.enable_grad():
            output = model(inp) if forward_fn is None else forward_fn(model, inp)
            if not isinstance(output, torch.Tensor) and (fisher == "true" or loss_fn is None):
                raise TypeError(
                    f"the model returned {type(output).__name__}; curvature capture needs a "
                    "tensor of logits (pass forward_fn=lambda model, batch: ... returning them), "
                    "or fisher='empirical' with a loss_fn(output, target) that takes this output"
                )
            n = _examples_in(output)
            if fisher == "true":
                loss = sampled_loss(output, likelihood, class_dim, generator)
                cap.grad_scale = 1.0
            else:
                if target is None:
                    raise ValueError(
                        "fisher='empirical' needs (input, target) batches, or dict batches with a "
                        "loss_fn(output, batch) that reads the labels from the dict; got no target"
                    )
                if isinstance(target, Mapping) and loss_fn is None:
                    raise ValueError(
                        "fisher='empirical' with dict batches needs loss_fn=lambda output, batch: ... "
                        "(it gets the whole dict as its target, to read the labels from)"
                    )
                fn = loss_fn or (lambda o, t: default_loss(o, t, class_dim))
                loss = fn(output, target)
                cap.grad_scale = float(n)
            if hasattr(cap, "grad_targets"):
                root = inp if isinstance(inp, torch.Tensor) and inp.requires_grad else None
                targets = cap.grad_targets(root)
            else:  # captures without grad_targets: reach every layer through its weight
                targets = [
                    m.weight
                    for n, m in cap.modules.items()
                    if n in cap.factors_for and m.weight.requires_grad
                ]
            if targets and loss.requires_grad:
                torch.autograd.grad(loss, targets, allow_unused=True)
    except BaseException:
        cap.abort_batch()
        raise
    committed = cap.end_batch(n)
    if check > 1:
        _check_slicing(model, cap, inp, output, check)
    return committed


_SLICE_RTOL = 1e-4  # a thinned pass must give the whole pass's outputs of its examples to this


def _examples_in(output: Any) -> int:
    """The batch size of a model's output: the first dimension of its first tensor (searched
    through tuples, lists, dicts and dataclasses: a model with several heads, under a ``loss_fn``
    of its own)."""
    for t in tensors_in(output):
        if t.dim() > 0:
            return t.shape[0]
    raise TypeError(f"the model's output ({type(output).__name__}) holds no tensor with a batch dimension")


def _thinned(
    model: nn.Module, cap: HookCapture, inp: Any, target: Any, forward_fn: Callable | None
) -> tuple[Any, Any, int]:
    """The batch the pass runs on, and the step ``s`` of the check still to do (1: none).

    Where ``cap`` takes its factors from every ``s``-th example (:meth:`KFACapture.example_step`),
    the model is in eval mode and the input is one tensor (with a tensor target of the same
    length, or none), the pass runs on every ``s``-th entry of the input's first dimension alone:
    it costs ``1/s`` as much and gives the same factors, *if* that dimension holds examples that
    are computed each on its own. That is checked once per capture, on its first such batch: the
    batch runs whole (the hooks thin the rows) and the caller compares the thinned pass's outputs
    with the whole pass's (:func:`_check_slicing`). A model that fails (a sequence-first input,
    examples that interact, random outputs) always runs whole. Anything else runs whole too."""
    step_of = getattr(cap, "example_step", None)
    if step_of is None or forward_fn is not None or not isinstance(inp, torch.Tensor) or inp.dim() == 0:
        return inp, target, 1
    if model.training or cap.slices is False:  # a batch statistic would see fewer examples
        return inp, target, 1
    step = step_of(inp.shape[0])
    if step == 1:
        return inp, target, 1
    if target is not None and not (
        isinstance(target, torch.Tensor) and target.dim() > 0 and target.shape[0] == inp.shape[0]
    ):
        return inp, target, 1
    if cap.slices is None:
        return inp, target, step  # whole, and checked
    return inp[::step], (None if target is None else target[::step]), 1


def _check_slicing(
    model: nn.Module, cap: HookCapture, inp: torch.Tensor, output: torch.Tensor, step: int
) -> None:
    """Whether ``model`` on every ``step``-th example of ``inp`` alone gives those examples' rows
    of ``output`` (the whole batch's), to :data:`_SLICE_RTOL` of its largest entry; recorded in
    ``cap.slices`` for the capture's next batches (the hooks are off: nothing is recorded)."""
    try:
        with torch.no_grad():
            alone = model(inp.detach()[::step])
    except Exception:  # e.g. a model that needs its whole batch: it runs whole
        cap.slices = False
        return
    if not isinstance(output, torch.Tensor):  # several outputs: not compared, the batch runs whole
        cap.slices = False
        return
    want = output.detach()[::step]
    ok = isinstance(alone, torch.Tensor) and alone.shape == want.shape and want.numel() > 0
    if ok:
        scale = float(want.abs().max())
        ok = bool(torch.isfinite(alone).all()) and float((alone - want).abs().max()) <= _SLICE_RTOL * scale
    cap.slices = bool(ok)


def capture_factors(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[Any],
    *,
    factors_for: Iterable[str],
    a_form: str = "channel",
    max_examples: int | None = None,
    a_columns: int = 1,
    **options: Unpack[CaptureOptions],
) -> CaptureResult:
    """Run ``model`` over ``batches`` in eval mode and accumulate K-FAC factors of ``modules``.

    The model is put in eval mode for the capture (BatchNorm uses and keeps its running
    statistics, dropout is off) and its modes are restored afterwards; hooks are removed also on
    errors. ``options`` (``fisher``, ``loss_fn``, ``input_fn``, ``likelihood``, ``class_dim``,
    ``generator``, ``max_batches``, ``forward_fn``) are those of :func:`drive_capture`; see
    :func:`capture_batch` for the two Fisher types; ``max_examples`` and ``a_columns`` are
    :class:`~lightning_eigendamage.curvature.KFACapture`'s. An ``nn.MultiheadAttention``'s ``out_proj``
    among ``factors_for`` is captured through its module call
    (:func:`~lightning_eigendamage.attention.route_out_projection`).
    """
    factors_for = list(factors_for)
    owners = functional_owners(model)
    routes = {modules[n]: owners[modules[n]] for n in factors_for if n in modules and modules[n] in owners}
    cap = KFACapture(
        modules,
        factors_for=factors_for,
        a_form=a_form,
        routes=routes,
        max_examples=max_examples,
        a_columns=a_columns,
    )
    drive_capture(model, cap, batches, what="curvature", **options)
    return cap.result()


def drive_capture(
    model: nn.Module,
    cap: HookCapture,
    batches: Iterable[Any],
    *,
    fisher: str = "true",
    loss_fn: Callable | None = None,
    input_fn: Callable | None = None,
    likelihood: str = "categorical",
    class_dim: int = -1,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    what: str = "curvature",
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> int:
    """Feed ``cap`` (a :class:`KFACapture` or any other :class:`HookCapture`) over ``batches``.

    The model runs in eval mode (modes restored afterwards); the hooks are on only inside this
    call and removed also on errors. The true Fisher's default generator is seeded with 0 on the
    model's device. Returns the number of batches seen; raises if there were none.
    """
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if fisher == "true" and generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    seen = 0
    try:
        with cap:
            for batch in first_batches(batches, max_batches):
                seen += 1
                if forward_fn is None:
                    inp, target = split_batch(batch, input_fn)
                else:
                    inp, target = batch, target_of(batch)
                first = _first_tensor(inp)
                if first is not None and first.shape[:1] == (0,):
                    raise ValueError(
                        f"batch {seen - 1} holds no examples (its input has shape "
                        f"{tuple(first.shape)}); {what} needs non-empty batches"
                    )
                capture_batch(
                    model,
                    cap,
                    to_device(inp, device),
                    to_device(target, device),
                    fisher=fisher,
                    loss_fn=loss_fn,
                    likelihood=likelihood,
                    class_dim=class_dim,
                    generator=generator,
                    forward_fn=forward_fn,
                )
    finally:
        for m, mode in modes.items():
            m.training = mode
    if seen == 0:
        raise ValueError(f"batches is empty: {what} needs at least one batch")
    return seen


def _first_tensor(x: Any) -> torch.Tensor | None:
    """The first tensor in ``x`` (a tensor, or tuples, lists and dicts of them), or None."""
    if torch.is_tensor(x):
        return x
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
    for item in items:
        t = _first_tensor(item)
        if t is not None:
            return t
    return None


def first_batches(batches: Iterable[Any], n: int | None) -> Iterator[Any]:
    """The first ``n`` of ``batches`` (all for None, the ``max_batches`` option), never drawing one
    more from a stream (it may not end)."""
    return iter(batches) if n is None else itertools.islice(batches, n)
