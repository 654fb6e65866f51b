"""`diffusion-po npo merge` against a direct computation of theta^- = theta^+ + Delta_NPO - alpha (theta^+ - theta_base)
on a tiny model, with the NPO weights as a LoRA (B @ A deltas computed by hand) and as a full network."""

from __future__ import annotations

import pytest
import torch

from diffusion_po.cli import main
from diffusion_po.commands.npo import merge_state_dicts
from diffusion_po.errors import ModelLoadError

torch.set_num_threads(1)


def test_merge_state_dicts_by_hand():
    pos = {"w": torch.tensor([1.0, 2.0]), "step": torch.tensor([3])}
    npo = {"w": torch.tensor([0.5, 1.0]), "step": torch.tensor([9])}
    base = {"w": torch.tensor([0.0, 1.0]), "step": torch.tensor([0])}
    out = merge_state_dicts(pos, npo, base, alpha=0.25, npo_scale=2.0)
    # [1 + 2*(0.5-0) - 0.25*(1-0), 2 + 2*(1-1) - 0.25*(2-1)]
    assert out["w"].tolist() == pytest.approx([1.75, 1.75])
    assert out["step"].tolist() == [3]  # non-float entries come from the positive model
    with pytest.raises(ModelLoadError, match="keys missing"):
        merge_state_dicts(pos, {"w": npo["w"]}, base)


@pytest.fixture(scope="module")
def parts(tiny_sd, tmp_path_factory):
    """Base pipeline, a positive network folder, an NPO LoRA folder with non-zero B, and its hand deltas."""
    from peft import LoraConfig

    from diffusion_po.families import load_family

    root = tmp_path_factory.mktemp("npo_merge")
    gen = torch.Generator().manual_seed(0)
    fam = load_family(tiny_sd)
    base_state = {k: v.clone() for k, v in fam.network.state_dict().items()}
    # positive: base + a random perturbation, saved as a training output folder (unet/)
    pos_net = load_family(tiny_sd).network
    with torch.no_grad():
        for p in pos_net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    pos_net.save_pretrained(root / "positive" / "unet")
    pos_state = {k: v.clone() for k, v in pos_net.state_dict().items()}
    # NPO LoRA on the base, B random so the delta is not zero; saved like the trainer does
    net = fam.network
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                               target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    deltas = {}
    with torch.no_grad():
        for name, module in net.named_modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                module.lora_B["default"].weight.copy_(0.05 * torch.randn(module.lora_B["default"].weight.shape, generator=gen))
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                deltas[f"{name}.weight"] = (b @ a) * (4 / 4)
    assert deltas
    fam.save_lora(root / "npo_lora", net)
    # a full NPO network: base + delta everywhere
    npo_full = load_family(tiny_sd).network
    with torch.no_grad():
        for p in npo_full.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    npo_full.save_pretrained(root / "npo_full" / "unet")
    return {"root": root, "base": base_state, "pos": pos_state, "deltas": deltas,
            "npo_full": {k: v.clone() for k, v in npo_full.state_dict().items()}}


def load_unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").state_dict()


def test_merge_lora_against_direct_computation(tiny_sd, parts):
    root, alpha = parts["root"], 0.3
    out = root / "neg_lora"
    rc = main(["npo", "merge", "--base", tiny_sd, "--npo", str(root / "npo_lora"),
               "--positive", str(root / "positive"), "--alpha", str(alpha), "-o", str(out)])
    assert rc == 0 and (out / "npo_merge.json").is_file()
    got = load_unet(out)
    base, pos = parts["base"], parts["pos"]
    for key, b in base.items():
        delta = parts["deltas"].get(key, torch.zeros_like(b))
        want = pos[key] + delta - alpha * (pos[key] - b)
        assert torch.allclose(got[key], want, atol=1e-5), key
    # the LoRA really changed something
    assert any(not torch.allclose(got[k], pos[k] - alpha * (pos[k] - base[k]), atol=1e-6) for k in parts["deltas"])


def test_merge_full_network_and_default_positive(tiny_sd, parts):
    root = parts["root"]
    out = root / "neg_full"
    assert main(["npo", "merge", "--base", tiny_sd, "--npo", str(root / "npo_full"), "-o", str(out)]) == 0
    got = load_unet(out)
    for key, v in parts["npo_full"].items():  # positive = base, alpha = 0: theta^- = theta_NPO
        assert torch.allclose(got[key], v, atol=1e-6), key
    out2 = root / "neg_full_alpha"
    assert main(["npo", "merge", "--base", tiny_sd, "--npo", str(root / "npo_full"), "--positive",
                 str(root / "positive"), "--alpha", "1", "--save-pipeline", "-o", str(out2)]) == 0
    # alpha = 1 cancels the positive offset: theta^- = theta_NPO again, and the pipeline loads
    from diffusion_po.families import load_pipeline

    pipe = load_pipeline(str(out2))
    for key, v in pipe.unet.state_dict().items():
        assert torch.allclose(v, parts["npo_full"][key], atol=1e-5), key


def test_merge_errors(tiny_sd, tiny_model_factory, parts, capsys):
    root = parts["root"]
    sdxl = tiny_model_factory("sdxl")
    rc = main(["npo", "merge", "--base", tiny_sd, "--npo", sdxl, "-o", str(root / "bad")])
    assert rc == 2
    assert "do not match" in capsys.readouterr().err
    rc = main(["npo", "merge", "--base", tiny_sd, "--npo", str(root / "nothing_here"), "-o", str(root / "bad2")])
    assert rc == 2
