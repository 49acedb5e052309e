"""End to end: what fastdiff derives from a model's weights (conv3x3's transformed filters, the K/V of
a cached context) follows an EMA weight swap done as training scripts and diffusers' EMAModel do it,
``p.data.copy_(ema_p)``, which moves no version counter.

Regression: after such a swap, sampling the digits U-Net differed from the reference backend by 0.64
(images in [-1, 1]) and a patched diffusers UNet by 2.34, because the filters of the old weights
were still in use.
"""

from __future__ import annotations

import pytest
import torch

import fastdiff


def _ema_swap(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter in place through ``.data`` with slightly moved values (an EMA)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data.copy_(p.data + 0.05 * p.data.std(correction=0) * torch.randn(p.shape, generator=g))


@pytest.mark.native
def test_digits_unet_samples_after_an_ema_swap_match_the_reference():
    from fastdiff.models import digits_unet
    from fastdiff.models.digits import digits_sampling

    model = digits_unet().eval()
    y = torch.arange(4)
    kw = dict(
        steps=4, cfg=4.0, cond={"y": y}, uncond={"y": torch.full_like(y, 10)}, generator=0, **digits_sampling(model)
    )
    with torch.no_grad():
        fastdiff.sample(model, (4, 1, 16, 16), **kw)  # the fused path remembers the filters
        _ema_swap(model, 1)
        fused = fastdiff.sample(model, (4, 1, 16, 16), **kw)
        model.set_backend("reference")
        reference = fastdiff.sample(model, (4, 1, 16, 16), **kw)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.native
def test_patched_diffusers_unet_after_an_ema_swap_matches_the_unpatched_model():
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[test]')")
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        add_attention=False,
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    fastdiff.patch(model, channels_last=True, backend="cpu")
    with torch.no_grad():
        model(x, 10)
        _ema_swap(model, 2)
        patched = model(x, 10).sample
        fastdiff.unpatch(model)
        unpatched = model(x, 10).sample
    torch.testing.assert_close(patched, unpatched, rtol=1e-4, atol=1e-4)
