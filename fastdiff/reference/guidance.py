"""Reference classifier-free guidance combine: the oracle for the native cfg_combine kernels."""

from __future__ import annotations

import torch

__all__ = ["cfg_combine"]


def cfg_combine(model_out: torch.Tensor, scale: float, upcast: bool = True) -> torch.Tensor:
    """``u + scale * (c - u)`` for ``model_out = [u; c]`` stacked on dim 0.

    model_out is (2B, *rest): the unconditional rows first, then the conditional ones, as the
    sampler's single model call on ``[uncond; cond]`` returns them. ``scale`` is the guidance scale
    of DESIGN.md (``scale = 1 + w`` in Ho & Salimans 2022, eq. 6): 1 gives the conditional
    prediction, 0 the unconditional one. With ``upcast`` the math runs in float32 (float64 stays
    float64) and the result is cast back to model_out's dtype. Returns a contiguous (B, *rest) tensor.
    """
    if not isinstance(model_out, torch.Tensor):
        raise TypeError(f"cfg_combine: model_out must be a tensor, got {type(model_out).__name__}")
    if model_out.dim() < 1 or model_out.shape[0] < 2 or model_out.shape[0] % 2 != 0:
        raise ValueError(
            "cfg_combine: model_out must have an even number (>= 2) of rows [uncond; cond] on dim 0, "
            f"got shape {tuple(model_out.shape)}"
        )
    compute = torch.promote_types(model_out.dtype, torch.float32) if upcast else model_out.dtype
    uncond, cond = model_out.to(compute).chunk(2, dim=0)
    return (uncond + scale * (cond - uncond)).to(model_out.dtype).contiguous()
