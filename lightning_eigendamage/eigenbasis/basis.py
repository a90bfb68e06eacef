"""Eigendecomposition of K-FAC factors and rotation of weights into the eigenbasis (KFE).

``A = Q_A diag(λ_A) Q_Aᵀ``, ``G = Q_G diag(λ_G) Q_Gᵀ`` (``torch.linalg.eigh``; float64 up to 512
wide, float32 above) and, for every kernel offset ``δ``, ``W*[:, δ, :] = Q_Gᵀ W[:, δ, :] Q_A``.
"""

from __future__ import annotations

import torch
from torch import nn

EIG_FLOOR = 1e-10
# Factors larger than this are decomposed in float32: 3-8× faster on CPU for 1024-2048 wide
# layers, with eigenvectors orthonormal to ~1e-6 (a rotated layer reproduces the dense one to about
# that relative error) and eigenvalues resolved to ~1e-7·λ_max, far below what scores distinguish.
EIGH_FLOAT64_MAX = 512


class EighError(RuntimeError):
    """A factor that no attempt could decompose into finite, consistent eigenpairs."""


def eigh_factor(
    factor: torch.Tensor, floor: float = EIG_FLOOR, float64_max: int = EIGH_FLOAT64_MAX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of a symmetric PSD factor, as float64.

    The decomposition runs in float64 for factors up to ``float64_max`` wide and in float32
    above (see ``EIGH_FLOAT64_MAX``). Eigenvalues at or below ``floor · λ_max`` (or below the
    working precision, ``10·eps·λ_max``), round-off negatives included, are set to 0: such
    directions carry no curvature. The factor is symmetrised first.

    Every result is checked (:func:`eigh_is_sound`: finite values and vectors, ``F v ≈ Q Λ Qᵀ v``
    and ``Q Qᵀ v ≈ v`` on probe vectors), because ``torch.linalg.eigh`` can return NaN without
    raising (seen in float32 on factors wider than 512). A failed or unsound result is redone in
    float64, then in float64 with a jitter of ``1e-12·mean eigenvalue`` on the diagonal (moves no
    eigenvector and no score measurably).

    Raises:
        EighError: the factor has non-finite entries, or no attempt gave a sound result.
    """
    f = factor.to(torch.float64)
    f = 0.5 * (f + f.T)
    if not bool(torch.isfinite(f).all()):
        raise EighError("the factor has non-finite entries")
    n = f.shape[0]
    # (working dtype, jittered?): the jittered copy is only built if the plain attempts fail.
    attempts = [(torch.float64, False), (torch.float64, True)]
    if n > float64_max:
        attempts.insert(0, (torch.float32, False))
    for work, jitter in attempts:
        m = f + _jitter(f) * torch.eye(n, dtype=f.dtype, device=f.device) if jitter else f
        try:
            evals, evecs = torch.linalg.eigh(m.to(work))
        except torch.linalg.LinAlgError:
            continue
        if eigh_is_sound(f, evals, evecs, work):
            return _floored(evals, evecs, work, floor)
    raise EighError(f"torch.linalg.eigh gave no finite, consistent result for a {n}×{n} factor")


def _jitter(f: torch.Tensor) -> float:
    return 1e-12 * max(float(torch.diagonal(f).mean()), 1e-300)


def eigh_is_sound(
    factor: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, work: torch.dtype, probes: int = 4
) -> bool:
    """Whether ``(evals, evecs)`` is a usable eigendecomposition of ``factor`` ``(n, n)``.

    Finite values and vectors, and on ``probes`` fixed random vectors ``V`` ``(n, probes)``:
    ``‖F V − Q Λ Qᵀ V‖ ≤ tol·‖F‖·‖V‖`` and ``‖Q Qᵀ V − V‖ ≤ tol·‖V‖`` with
    ``tol = max(1e-6, 50·n·eps(work))``: far above what a backward-stable ``eigh`` leaves
    (``O(n·eps)``), far below a wrong basis. Costs ``O(n²·probes)``, nothing next to ``eigh``.
    """
    if not (bool(torch.isfinite(evals).all()) and bool(torch.isfinite(evecs).all())):
        return False
    n = factor.shape[0]
    if n == 0:
        return True
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(n, probes, generator=gen, dtype=torch.float64).to(factor.device)
    q, lam = evecs.to(torch.float64), evals.to(torch.float64)
    qtv = q.T @ v
    tol = max(1e-6, 50 * n * torch.finfo(work).eps)
    scale = float(torch.linalg.matrix_norm(factor, ord=2)) if n <= 64 else float(factor.abs().sum(1).max())
    resid = float((factor @ v - q @ (lam[:, None] * qtv)).norm())
    ortho = float((q @ qtv - v).norm())
    return resid <= tol * max(scale, 1e-300) * float(v.norm()) and ortho <= tol * float(v.norm())


def _floored(
    evals: torch.Tensor, evecs: torch.Tensor, work: torch.dtype, floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    evals, evecs = evals.to(torch.float64), evecs.to(torch.float64)
    top = float(evals[-1]) if evals.numel() else 0.0
    rel = max(floor, 10 * torch.finfo(work).eps)
    cutoff = rel * top if top > 0 else 0.0
    evals = torch.where(evals <= cutoff, torch.zeros_like(evals), evals)
    return evals, evecs


# Same-size factors up to this width are decomposed in one batched ``eigh`` call: one launch
# instead of one per factor (a large saving on GPUs, small on CPUs).
EIGH_BATCH_MAX = 512


def eigh_factors(
    factors: list[torch.Tensor], floor: float = EIG_FLOOR, float64_max: int = EIGH_FLOAT64_MAX
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`eigh_factor` of every factor, same-size ones (up to ``EIGH_BATCH_MAX`` wide, on the
    same device) in one batched call; a batch that fails to converge, and any unsound result in
    it, is redone factor by factor (with :func:`eigh_factor`'s fallbacks). A factor that cannot be
    decomposed at all comes back as NaN values and vectors, for the caller to leave its layer
    whole (a NaN pair also broadcasts like any other under ``split_eigh``)."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(factors)
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(factors):
        n = f.shape[0]
        if n <= EIGH_BATCH_MAX:
            groups.setdefault((n, f.device), []).append(i)
    for (n, _), idx in groups.items():
        if len(idx) < 2:
            continue
        work = torch.float64 if n <= float64_max else torch.float32
        stack = torch.stack([factors[i].to(torch.float64) for i in idx])
        stack = 0.5 * (stack + stack.transpose(1, 2))
        try:
            evals, evecs = torch.linalg.eigh(stack.to(work))
        except torch.linalg.LinAlgError:
            continue  # done one by one below
        for j, i in enumerate(idx):
            if eigh_is_sound(stack[j], evals[j], evecs[j], work):
                out[i] = _floored(evals[j], evecs[j], work, floor)  # else: redone alone below
    return [r if r is not None else _eigh_or_nan(f, floor, float64_max) for r, f in zip(out, factors)]


def _eigh_or_nan(factor: torch.Tensor, floor: float, float64_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return eigh_factor(factor, floor, float64_max)
    except EighError:
        n = factor.shape[0]
        nan = torch.full((n, n), float("nan"), dtype=torch.float64, device=factor.device)
        return nan[0].clone(), nan


def weight_as_3d(weight: torch.Tensor) -> torch.Tensor:
    """A layer weight as ``(C_out, k², C_in)``: ``(C_out, C_in, *kernel)`` (any convolution) or
    Linear ``(C_out, C_in)`` (``k² = 1``).

    The conv layout is permuted (not viewed): ``W3[o, δ, i] = W[o, i, *δ]`` with ``δ`` the
    row-major index of the kernel offset (``δ = δh·kw + δw`` for a Conv2d).
    """
    if weight.dim() >= 3:
        c_out, c_in = weight.shape[:2]
        return weight.permute(0, *range(2, weight.dim()), 1).reshape(c_out, -1, c_in)
    return weight.unsqueeze(1)


def weight_from_3d(w3: torch.Tensor, like: nn.Module) -> torch.Tensor:
    """Inverse of :func:`weight_as_3d` for a module shaped like ``like`` (its kernel dimensions)."""
    kernel = tuple(like.weight.shape[2:])
    if not kernel:
        return w3.squeeze(1).contiguous()
    c_out, _, c_in = w3.shape
    nd = len(kernel)
    return w3.reshape(c_out, *kernel, c_in).permute(0, nd + 1, *range(1, nd + 1)).contiguous()


def to_kfe(w3: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor) -> torch.Tensor:
    """``W*[:, δ, :] = Q_Gᵀ W[:, δ, :] Q_A`` for ``w3`` ``(C_out, k², C_in)``."""
    c_out, k2, c_in = w3.shape
    left = (q_g.T @ w3.reshape(c_out, k2 * c_in)).reshape(-1, c_in)  # (r_out·k², C_in)
    return (left @ q_a).reshape(q_g.shape[1], k2, q_a.shape[1])
