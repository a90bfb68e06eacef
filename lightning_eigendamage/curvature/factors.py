"""Per-batch K-FAC factor contributions: pure functions on tensors, tested against brute force.

Every function returns *sums* over the batch (and the number of rows summed) so that a capture can
accumulate them exactly and average once; see the package docstring for the definitions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

A_FORMS = ("channel", "patch")


def conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Explicit ``(top, bottom, left, right)`` padding of a Conv2d, resolving ``"same"``/``"valid"``.

    ``"same"`` splits ``dilation·(k−1)`` as PyTorch does: ``total // 2`` before, the rest after.
    """
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for d, k in zip(conv.dilation, conv.kernel_size):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    ph, pw = conv.padding
    return (ph, ph, pw, pw)


def _read_counts(size: int, pad_lo: int, pad_hi: int, k: int, s: int, d: int, n_out: int) -> torch.Tensor:
    """Reads per padded-input position along one axis: ``c[p] = #{(t, δ): t·s + δ·d = p}``.

    ``size`` input positions padded by ``pad_lo``/``pad_hi``, kernel size ``k``, stride ``s``,
    dilation ``d``, ``n_out`` output positions; returns ``(size + pad_lo + pad_hi,)`` float64 on CPU.
    """
    c = torch.zeros(size + pad_lo + pad_hi, dtype=torch.float64)
    starts = torch.arange(n_out) * s
    for delta in range(k):
        c.index_add_(0, starts + delta * d, torch.ones(n_out, dtype=torch.float64))
    return c


def _axis_counts(
    conv: nn.Conv2d, h: int, w: int, h_out: int, w_out: int, *, crop: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis read counts ``(c_h, c_w)`` of a conv on an ``(H, W)`` input with ``(H_out, W_out)``
    outputs; the count map is separable: ``c[i, j] = c_h[i] · c_w[j]``.

    The counts run over the padded grid ``(H+pt+pb,)``, ``(W+pl+pr,)``; with ``crop=True`` the
    zero-padding border is cut off (those pixels are zeros), leaving ``(H,)``, ``(W,)``.
    """
    top, bottom, left, right = conv_padding(conv)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ch = _read_counts(h, top, bottom, kh, sh, dh, h_out)
    cw = _read_counts(w, left, right, kw, sw, dw, w_out)
    if crop:
        ch, cw = ch[top : top + h], cw[left : left + w]
    return ch, cw


def gram(v: torch.Tensor) -> torch.Tensor:
    """``Σ_n V_n V_nᵀ`` for ``v`` ``(N, C, P)``: ``(C, C)``.

    Batched products for narrow layers (no copy of ``v``); one transposing copy and a single
    GEMM for wide ones, where that is faster.
    """
    n, c, p = v.shape
    if c <= 128:
        return torch.bmm(v, v.transpose(1, 2)).sum(0)
    rows = v.transpose(0, 1).reshape(c, n * p)
    return rows @ rows.T


def conv_channel_a(
    x: torch.Tensor, conv: nn.Conv2d, h_out: int, w_out: int, cache: dict | None = None
) -> tuple[torch.Tensor, int]:
    """Channel-form ``Σ_{n,t,δ} a aᵀ`` for a conv input ``x`` ``(N, C_in, H, W)``.

    Returns the ``(C_in, C_in)`` sum (not yet averaged) and the number of reads ``N·T·kh·kw``.
    Uses ``Xᵀ diag(c) X`` with the separable count map ``c = c_h ⊗ c_w``: rows and columns that
    are never read (``c = 0``, e.g. the skipped pixels of a strided 1×1 conv) are dropped first;
    uniform counts need no weighting copy at all. ``cache`` (any dict) keeps the per-shape counts.
    """
    n, c_in, h, w = x.shape
    key = (id(conv), h, w, h_out, w_out)
    prep = cache.get(key) if cache is not None else None
    if prep is None:
        crop = conv.padding_mode == "zeros"
        ch, cw = _axis_counts(conv, h, w, h_out, w_out, crop=crop)
        ih, iw = ch.nonzero().squeeze(1), cw.nonzero().squeeze(1)
        ih = None if ih.numel() == ch.numel() else ih.to(x.device)
        iw = None if iw.numel() == cw.numel() else iw.to(x.device)
        ch = ch[ch > 0]
        cw = cw[cw > 0]
        uniform = bool((ch == ch[0]).all() and (cw == cw[0]).all())
        weight = float(ch[0] * cw[0]) if uniform else (ch.sqrt()[:, None] * cw.sqrt()[None, :]).to(x.device)
        prep = (crop, ih, iw, uniform, weight)
        if cache is not None:
            cache[key] = prep
    crop, ih, iw, uniform, weight = prep
    if not crop:  # a padding mode other than zeros: its border pixels are read
        x = _padded(x, conv)
    if ih is not None:
        x = x.index_select(2, ih)
    if iw is not None:
        x = x.index_select(3, iw)
    if uniform:
        a = gram(x.reshape(n, c_in, -1)) * weight
    else:
        a = gram((x * weight.to(x.dtype)).reshape(n, c_in, -1))
    reads = n * h_out * w_out * conv.kernel_size[0] * conv.kernel_size[1]
    return a, reads


def _padded(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A conv input ``x`` ``(N, C_in, H, W)`` padded as ``conv`` pads it (any padding mode)."""
    top, bottom, left, right = conv_padding(conv)
    if any((top, bottom, left, right)):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, (left, right, top, bottom), mode=mode)
    return x


def conv_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Unfolded input patches ``(N, C_in·kh·kw, T)`` of a conv input ``x`` ``(N, C_in, H, W)`` (any
    padding mode), in ``weight.reshape(C_out, -1)`` column order."""
    return F.unfold(_padded(x, conv), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)


_BLOCK_FLOATS = 2**25  # at most ~128 MiB (float32) of per-row products held at once


def conv_patch_a(
    x: torch.Tensor, conv: nn.Conv2d, columns: tuple[int, int] = (1, 0)
) -> tuple[torch.Tensor, int]:
    """Patch-form ``Σ_{n,t} p pᵀ`` ``(C_in·kh·kw, C_in·kh·kw)`` and the number of rows ``N·T``.

    ``p`` is the ``C_in·kh·kw`` patch read at output position ``t = (i, j)``: entry ``(c, a, b)``
    is ``X[n, c, i·sh + a·dh, j·sw + b·dw]`` of the padded input ``X`` ``(N, C_in, Hp, Wp)``.
    Two ways give the same sum:

    - *row lags* (used where it needs fewer multiply-adds): with ``Z[r]`` ``(C_in·kw, N·W_out)``
      the input row ``r`` unfolded along the width only (``Z[r][(c, b), (n, j)] = X[n, c, r,
      j·sw + b·dw]``), the block of kernel rows ``(a, a')`` is
      ``Σ_{i<H_out} Z[r_i] Z[r_i + (a'−a)·dh]ᵀ`` with ``r_i = i·sh + a·dh``. One batched product
      per row lag ``a' − a ≥ 0`` serves every ``a`` (the blocks of negative lags are transposes):
      about ``kh`` times fewer multiply-adds than the full Gram, and a copy ``kw`` (not
      ``kh·kw``) times the input's size;
    - *unfolding* (:func:`conv_patches`) and one Gram of the patches.

    ``columns = (every, first)`` sums over the output columns ``j = first, first + every, …``
    only (``every`` times fewer rows and products; the row count returned is of those): the
    same maths on the input from column ``first·sw`` on, read at stride ``every·sw``.
    """
    x = _padded(x, conv)
    n, c, hp, wp = x.shape
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    h_out = (hp - dh * (kh - 1) - 1) // sh + 1
    w_out = (wp - dw * (kw - 1) - 1) // sw + 1
    every, first = columns
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"columns must be (every ≥ 1, first), got {columns!r}")
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < min(every, w_out):
        raise ValueError(
            f"columns must be (every, first) with 0 ≤ first < every and first < the output width "
            f"{w_out}, got {columns!r}"
        )
    if every > 1 or first:
        # output columns first, first + every, …: the input from column first·sw on, stride every·sw
        x = x[..., first * sw :]
        w_out = -(-(w_out - first) // every)
        sw = sw * every
    # rows r = 0 … (kh−1−lag)·dh + (H_out−1)·sh of each lag's product are read
    spans = [(kh - 1 - lag) * dh + (h_out - 1) * sh + 1 for lag in range(kh)]
    if kh > 1 and sum(spans) < kh * kh * h_out:
        geometry = ((kh, kw), (sh, sw), (dh, dw), (h_out, w_out))
        if sh == 1 and c * kw >= _WIDE:
            return _patch_a_by_row_ranges(x, *geometry), n * h_out * w_out
        return _patch_a_by_row_lags(x, *geometry, spans), n * h_out * w_out
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=(sh, sw))  # (N, d, T)
    d, t = patches.shape[1:]
    if 2 * t >= d:
        # many positions per example: Σ_n P_n P_nᵀ by batched products on (N, d, T) as it is
        chunk = max(1, min(n, _BLOCK_FLOATS // max(d * d, 1)))
        a = patches.new_zeros(d, d)
        for i in range(0, n, chunk):
            p = patches[i : i + chunk]
            a += torch.bmm(p, p.transpose(1, 2)).sum(0)
        return a, n * t
    rows = patches.transpose(1, 2).reshape(-1, d)  # (N·T, d)
    return rows.T @ rows, rows.shape[0]


# From this width C_in·kw on, a stride-1 conv's patch-form A is summed by one product per range
# of input rows (_patch_a_by_row_ranges) rather than per row: each row's (C_in·kw)² product would
# be written out, more than the N·W_out columns it reads when a wide layer's maps are small.
_WIDE = 384


def _patch_a_by_row_ranges(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    out_size: tuple[int, int],
) -> torch.Tensor:
    """The row-lag sum of :func:`conv_patch_a` for a row stride of 1, by ranges of rows.

    With ``Z`` ``(C·kw, Hp, N·W_out)`` (``Z[:, r]`` the input row ``r`` unfolded along the width),
    the block of kernel rows ``(a, a + l)`` is ``M_l(a·dh, a·dh + H_out)``, where
    ``M_l(lo, hi) = Σ_{lo ≤ r < hi} Z[:, r] Z[:, r + l·dh]ᵀ`` is one product over the rows of the
    range side by side. The range ``[(kh−1−l)·dh, H_out)`` that every ``a`` reads is summed once
    per lag; each ``a`` adds the rows before and after it (at most ``(kh−1)·dh`` each).
    """
    n, c, hp, _ = x.shape
    (kh, kw), (_, sw), (dh, dw), (h_out, w_out) = kernel, stride, dilation, out_size
    s = x.stride()
    width = c * kw
    # z[(c, b), r, (n, j)] = X[n, c, r, j·sw + b·dw]: one copy, kw times the input
    z = x.as_strided((c, kw, hp, n, w_out), (s[1], s[3] * dw, s[2], s[0], s[3] * sw))
    z = z.reshape(width, hp, n * w_out)

    def rows(lo: int, hi: int, shift: int) -> torch.Tensor | None:
        if hi <= lo:
            return None
        return z[:, lo:hi].reshape(width, -1) @ z[:, lo + shift : hi + shift].reshape(width, -1).T

    a6 = x.new_empty(c, kh, kw, c, kh, kw)  # every block (a, a') is written below
    for lag in range(kh):
        shift = lag * dh
        lo_all, hi_all = (kh - 1 - lag) * dh, h_out  # the rows every kernel row a reads
        common = rows(lo_all, hi_all, shift)
        for a in range(kh - lag):
            lo, hi = a * dh, a * dh + h_out
            if common is None:
                block = rows(lo, hi, shift)
            else:
                block = common  # not changed in place: a fresh sum where a part is added
                for part in (rows(lo, min(lo_all, hi), shift), rows(max(hi_all, lo), hi, shift)):
                    if part is not None:
                        block = block + part if block is common else block.add_(part)
            _put_block(a6, block, a, lag)
    return a6.reshape(c * kh * kw, c * kh * kw)


def _patch_a_by_row_lags(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    out_size: tuple[int, int],
    spans: list[int],
) -> torch.Tensor:
    """The row-lag sum of :func:`conv_patch_a` on the padded input ``x`` ``(N, C, Hp, Wp)``."""
    n, c, _, _ = x.shape
    (kh, kw), (sh, sw), (dh, dw), (h_out, w_out) = kernel, stride, dilation, out_size
    s = x.stride()
    width = c * kw
    rows_used = spans[0]
    z = x.as_strided((rows_used, c, kw, n, w_out), (s[2], s[1], s[3] * dw, s[0], s[3] * sw))
    z = z.reshape(rows_used, width, n * w_out)  # one copy, kw times the input rows it holds
    a6 = x.new_empty(c, kh, kw, c, kh, kw)  # every block (a, a') is written below
    chunk = max(1, _BLOCK_FLOATS // (width * width))
    for lag in range(kh):
        shift = lag * dh
        sums = [x.new_zeros(width, width) for _ in range(kh - lag)]
        for r0 in range(0, spans[lag], chunk):
            r1 = min(spans[lag], r0 + chunk)
            prod = torch.bmm(z[r0:r1], z[r0 + shift : r1 + shift].transpose(1, 2))  # (r1−r0, w, w)
            for a in range(kh - lag):
                first = a * dh  # kernel row a reads rows first + i·sh, i < H_out
                lo = first + max(0, -(-(r0 - first) // sh)) * sh
                hi = min(r1, first + (h_out - 1) * sh + 1)
                if lo < hi:
                    sums[a] += prod[lo - r0 : hi - r0 : sh].sum(0)
        for a, block in enumerate(sums):
            _put_block(a6, block, a, lag)
    return a6.reshape(c * kh * kw, c * kh * kw)


def _put_block(a6: torch.Tensor, block: torch.Tensor, a: int, lag: int) -> None:
    """Write the block ``(C·kw, C·kw)`` of kernel rows ``(a, a + lag)`` into ``a6``
    ``(C, kh, kw, C, kh, kw)``, and its transpose as the block ``(a + lag, a)``."""
    c, _, kw = a6.shape[:3]
    block = block.view(c, kw, c, kw)
    a6[:, a, :, :, a + lag, :] = block
    if lag:
        a6[:, a + lag, :, :, a, :] = block.permute(2, 3, 0, 1)


def linear_a(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``Σ a aᵀ`` over all examples and leading positions of ``x`` ``(N, *, C_in)``, and the count."""
    rows = x.reshape(-1, x.shape[-1])
    return rows.T @ rows, rows.shape[0]


def output_g(grad: torch.Tensor, is_conv: bool) -> tuple[torch.Tensor, int]:
    """``Σ D Dᵀ`` over examples and locations of an output gradient, and the number of rows.

    ``grad`` is ``(N, C_out, H_out, W_out)`` for a conv, ``(N, *, C_out)`` for a Linear.
    """
    if is_conv:
        n, c = grad.shape[:2]
        v = grad.reshape(n, c, -1)
        return gram(v), n * v.shape[2]
    rows = grad.reshape(-1, grad.shape[-1])
    return rows.T @ rows, rows.shape[0]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype factor products are computed in for tensors of ``dtype``: float64 stays float64,
    anything else (float32, bf16, fp16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
