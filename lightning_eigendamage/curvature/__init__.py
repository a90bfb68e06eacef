"""K-FAC factor capture for ``nn.Linear`` and ``nn.Conv2d``.

For a layer with input activations ``a`` and pre-activation output ``s`` let ``D = ∂ℓ_n/∂s`` be
the gradient of the per-example loss ``ℓ_n``. With PyTorch's row-major weight layout the
per-example weight gradient is ``D aᵀ`` and the layer's Fisher block is ``F ≈ G ⊗ A`` with

- Linear ``(C_out, C_in)`` on inputs ``(N, *, C_in)``: every leading position (token) is a
  location; ``A = E_{n,t}[a aᵀ]`` ``(C_in, C_in)``, ``G = E_{n,t}[D Dᵀ]`` ``(C_out, C_out)``.
- Conv2d, *channel* form (EigenDamage): ``A = E_{n,t,δ}[a_{tδ} a_{tδ}ᵀ]`` over output locations
  ``t`` and kernel offsets ``δ``, ``(C_in, C_in)``; ``G = E_{n,t}[D_t D_tᵀ]``.
- Conv2d, *patch* form (standard K-FAC, for baselines): ``A = E_{n,t}[p_t p_tᵀ]`` with ``p_t`` the
  ``C_in·kh·kw`` patch in ``weight.view(C_out, -1)`` order.

The channel form is computed without unfolding: every pixel ``p`` of the padded input is read by
``c_p`` (offset, location) pairs, so ``Σ_{t,δ} a aᵀ = Xᵀ diag(c) X``; it is normalised by the
number of reads ``N·T·kh·kw`` (zero-padded reads included). See ``docs/method.md`` §1.

Gradients ``D`` are taken with tensor hooks registered on each layer's output inside its forward
hook, so in-place ops after the layer (``ReLU(inplace=True)``) do not change what is seen, and the
backward is run with :func:`torch.autograd.grad`, so parameter ``.grad`` is never touched.

The package has three modules; data flows one way, ``driver → hooks → factors``:

- :mod:`.factors`: the per-batch contributions above, pure functions on tensors;
- :mod:`.hooks`: the hook lifecycle shared by every capture (:class:`HookCapture`), the K-FAC
  capture (:class:`KFACapture`) and what it accumulates (:class:`LayerFactors`,
  :class:`CaptureResult`);
- :mod:`.driver`: batch and loss helpers and the batch loop (:func:`capture_batch`,
  :func:`drive_capture`, :func:`capture_factors`).
"""

from .driver import (
    FISHER_TYPES,
    LIKELIHOODS,
    CaptureOptions,
    capture_batch,
    capture_factors,
    check_categorical,
    default_loss,
    drive_capture,
    first_batches,
    sampled_loss,
    split_batch,
    target_of,
    to_device,
)
from .factors import (
    A_FORMS,
    compute_dtype,
    conv_channel_a,
    conv_padding,
    conv_patch_a,
    conv_patches,
    gram,
    linear_a,
    output_g,
)
from .hooks import (
    CaptureResult,
    HookCapture,
    KFACapture,
    LayerFactors,
    channel_form,
    compiled_code_sees_hooks,
    holds_compiled,
)

__all__ = [
    "A_FORMS",
    "FISHER_TYPES",
    "LIKELIHOODS",
    "CaptureOptions",
    "CaptureResult",
    "HookCapture",
    "KFACapture",
    "LayerFactors",
    "capture_batch",
    "check_categorical",
    "capture_factors",
    "channel_form",
    "compiled_code_sees_hooks",
    "compute_dtype",
    "conv_channel_a",
    "conv_padding",
    "conv_patch_a",
    "conv_patches",
    "default_loss",
    "drive_capture",
    "first_batches",
    "gram",
    "holds_compiled",
    "linear_a",
    "output_g",
    "sampled_loss",
    "split_batch",
    "target_of",
    "to_device",
]
