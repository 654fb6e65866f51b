"""How many graphs `compile: blocks` makes (a counting backend: dynamo captures, nothing is generated).

Compile start-up grows with the number of distinct graphs. The UNet families compile whole down, mid and up
blocks: at SD1.5 size that is 9 forward graphs (full fine-tune and LoRA alike), against 19 (21 with LoRA)
when every BasicTransformerBlock and ResnetBlock2D was compiled on its own, and the 9 regions hold about
three times as many operations (the transformer wrappers' norms and projections, the up/down samplers and
the skip concatenations no longer run eagerly between compiled pieces).
"""

from __future__ import annotations

import pytest
import torch


def _count(network: torch.nn.Module, blocks: tuple[str, ...], x: torch.Tensor, t: torch.Tensor,
           cond: torch.Tensor) -> tuple[int, int, int]:
    """(compiled modules, forward graphs, captured operations) of one forward + backward."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    from diffusion_po.families.base import compile_regions, raise_compile_limits
    from diffusion_po.families.compiling import uncompile

    dynamo.reset()
    raise_compile_limits()
    counter = CompileCounter()
    n = compile_regions(network, blocks, backend=counter)
    network(x, t, cond).sample.float().mean().backward()
    frames, ops = counter.frame_count, counter.op_count
    uncompile(network)
    dynamo.reset()
    return n, frames, ops


def test_unet_compiles_whole_blocks_tiny(tiny_sd):
    from diffusers import UNet2DConditionModel

    from diffusion_po.families.sd import StableDiffusionFamily

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    blocks = StableDiffusionFamily.repeated_blocks
    expected = len(unet.down_blocks) + len(unet.up_blocks) + 1  # every down and up block, and the mid block
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    n, frames, _ = _count(unet, blocks, x, t, cond)
    assert n == expected and frames == expected  # one graph each, no graph break


@pytest.mark.slow  # an SD1.5-size UNet (860M parameters) at 64 px: ~40 s on one CPU thread
def test_sd15_size_graph_count():
    from diffusion_po.bench.models import sd15_unet
    from diffusion_po.families.sd import StableDiffusionFamily

    torch.manual_seed(0)
    unet = sd15_unet(8)
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 768, generator=g)
    n, frames, ops = _count(unet, StableDiffusionFamily.repeated_blocks, x, t, cond)
    old_n, old_frames, old_ops = _count(unet, ("BasicTransformerBlock", "ResnetBlock2D"), x, t, cond)
    assert (n, frames) == (9, 9)  # the count this layout reaches; a change that adds graphs fails here
    assert old_frames == 19 and ops > 2 * old_ops
