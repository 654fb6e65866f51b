"""LoRA export to kohya keys (sd-scripts; what AUTOMATIC1111, Forge, ComfyUI and InvokeAI load), with a
per-module `.alpha`, from the diffusers-format `pytorch_lora_weights.safetensors` that `Family.save_lora` writes.

- `sd` / `sdxl`: `lora_unet_<diffusers module path, dots as _>.lora_down.weight / .lora_up.weight / .alpha`
  (diffusers' `convert_state_dict_to_kohya` naming; A1111's and ComfyUI's loaders map these names for SD1.x
  and SDXL).
- `flux`: sd-scripts' FLUX.1 names (`lora_unet_double_blocks_N_img_attn_qkv`, `..._single_blocks_N_linear1`,
  ...). The original model fuses q/k/v (and, in single blocks, the MLP input) into one linear, so their
  LoRAs are stacked: `lora_down` = [A_q; A_k; A_v], `lora_up` = block-diagonal(B_q, B_k, B_v), alpha scaled
  by the stacked rank (exactly the same update; diffusers' kohya loader splits them back). diffusers'
  loader assumes FLUX.1's widths (3072 / MLP 12288) for single blocks, so other widths are refused there.

alpha comes from the adapter metadata diffusers stores in the file header (`lora_adapter_metadata`:
`<network>.lora_alpha`, `alpha_pattern`, `rank_pattern`, `use_rslora`); without it alpha = rank, as diffusers'
own loader reads such a file.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusion_po.errors import ModelLoadError, UserError
from diffusion_po.families.base import LORA_FAMILY_KEY, LORA_WEIGHT_FILE

if TYPE_CHECKING:
    import torch

#: the LoRA file and the header key naming the family it was saved for (what `Family.save_lora` writes)
LORA_FILE, FAMILY_HEADER_KEY = LORA_WEIGHT_FILE, LORA_FAMILY_KEY
#: the header key under which diffusers' `save_lora_weights` stores the adapter's LoraConfig
METADATA_HEADER_KEY = "lora_adapter_metadata"
#: families with a kohya export, and the network their LoRA keys address
KOHYA_FAMILIES = {"sd": "unet", "sdxl": "unet", "flux": "transformer"}
#: FLUX.1 widths that diffusers' kohya loader hard-codes for single blocks (q, k, v, MLP input)
FLUX1_SINGLE_DIMS = (3072, 3072, 3072, 12288)


def lora_file(path: str | Path) -> Path:
    """The LoRA's .safetensors file: `path` itself or `path/pytorch_lora_weights.safetensors`."""
    p = Path(path)
    file = p / LORA_FILE if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"'{path}': no LoRA here (expected a .safetensors file or a folder with {LORA_FILE})")
    return file


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a LoRA .safetensors file or folder."""
    from safetensors import safe_open

    file = lora_file(path)
    try:
        with safe_open(str(file), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelLoadError(f"'{file}': cannot read the LoRA ({str(exc).splitlines()[0]})") from exc


def _modules(state: dict[str, torch.Tensor], network: str, file: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A = down, B = up)} of the network's LoRA (diffusers `lora.down/up` or peft `lora_A/B` keys)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in state.items():
        m = re.fullmatch(rf"{network}\.(.+)\.(lora\.down|lora\.up|lora_A|lora_B)\.weight", key)
        if m is None:
            other.append(key)
            continue
        pairs.setdefault(m[1], {})["A" if m[2] in ("lora.down", "lora_A") else "B"] = value
    if other:
        raise UserError(f"'{file}': keys this export does not handle, e.g. {other[:3]} (only {network} LoRA "
                        "weights are exported; text-encoder and DoRA LoRAs are not supported)")
    broken = [name for name, ab in pairs.items() if set(ab) != {"A", "B"}]
    if broken or not pairs:
        raise UserError(f"'{file}': no complete {network} LoRA (down/up pairs) found" +
                        (f"; incomplete: {broken[:3]}" if broken else ""))
    return {name: (ab["A"], ab["B"]) for name, ab in sorted(pairs.items())}


def _adapter_config(header: dict[str, str], network: str, file: str) -> dict[str, Any]:
    """The LoraConfig entries diffusers stored for `network` (empty without metadata)."""
    raw = header.get(METADATA_HEADER_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"'{file}': the {METADATA_HEADER_KEY} header is not JSON ({exc})") from exc
    return {k.removeprefix(f"{network}."): v for k, v in config.items() if k.startswith(f"{network}.")}


def module_scales(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict[str, Any],
                  file: str) -> dict[str, float]:
    """{module: alpha} such that alpha / rank is the scale peft applies to the module's B @ A."""
    from peft.utils.other import get_pattern_key

    if config.get("use_dora"):
        raise UserError(f"'{file}' is a DoRA adapter; kohya's LoRA keys cannot express DoRA's magnitude vectors")
    alpha_pattern, rank_pattern = config.get("alpha_pattern") or {}, config.get("rank_pattern") or {}
    alphas = {}
    for name, (down, _up) in modules.items():
        rank = down.shape[0]
        if "lora_alpha" in config:
            alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config["lora_alpha"]))
        else:  # no metadata: diffusers' loader uses alpha = r
            alpha = float(rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), rank))
        scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
        alphas[name] = scale * rank
    return alphas


def detect_family(state: dict[str, torch.Tensor], header: dict[str, str], file: str) -> str:
    """The family a LoRA file is for: the header's family name, else `sd` for unet keys (SD and SDXL
    export alike); transformer LoRAs need the family named (`--family flux`)."""
    if header.get(FAMILY_HEADER_KEY):
        return header[FAMILY_HEADER_KEY]
    networks = {k.split(".", 1)[0] for k in state}
    if networks == {"unet"}:
        return "sd"
    raise UserError(f"'{file}': cannot tell the model family from the keys ({', '.join(sorted(networks))}); "
                    f"name it with --family ({', '.join(KOHYA_FAMILIES)})")


# ----------------------------------------------------------------------------- FLUX.1 names
#: diffusers FluxTransformer2DModel module -> (sd-scripts module, part index in a fused module, parts)
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3), "attn.to_v": ("img_attn_qkv", 2, 3),
    "attn.to_out.0": ("img_attn_proj", 0, 1),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3), "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff.net.0.proj": ("img_mlp_0", 0, 1), "ff.net.2": ("img_mlp_2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1), "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1), "norm1_context.linear": ("txt_mod_lin", 0, 1),
}
_FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation_lin", 0, 1),
}
_FLUX_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
}


def _flux_target(name: str) -> tuple[str, int, int]:
    """diffusers module path -> (sd-scripts module, part, parts), or a UserError for modules without a name."""
    for pattern, table, prefix in ((r"transformer_blocks\.(\d+)\.(.+)", _FLUX_DOUBLE, "double_blocks"),
                                   (r"single_transformer_blocks\.(\d+)\.(.+)", _FLUX_SINGLE, "single_blocks")):
        m = re.fullmatch(pattern, name)
        if m and m[2] in table:
            target, part, parts = table[m[2]]
            return f"lora_unet_{prefix}_{m[1]}_{target}", part, parts
    if name in _FLUX_TOP:
        return f"lora_unet_{_FLUX_TOP[name]}", 0, 1
    raise UserError(f"module '{name}' has no sd-scripts FLUX.1 name (kohya export covers the attention, MLP, "
                    "modulation and embedder linears of the blocks)")


def _flux_kohya(modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    import torch

    groups: dict[str, dict[int, str]] = {}
    sizes: dict[str, int] = {}
    for name in modules:
        target, part, parts = _flux_target(name)
        groups.setdefault(target, {})[part] = name
        sizes[target] = parts
    out: dict[str, torch.Tensor] = {}
    for target, members in groups.items():
        parts = sizes[target]
        if parts == 1:
            down, up = modules[members[0]]
            out.update({f"{target}.lora_down.weight": down, f"{target}.lora_up.weight": up,
                        f"{target}.alpha": torch.tensor(alphas[members[0]])})
            continue
        first_down, first_up = modules[next(iter(members.values()))]
        rank, in_features = first_down.shape
        if target.endswith("linear1"):  # q, k, v, MLP input: widths from the model's attention width
            dims = [first_up.shape[0]] * 3 + [modules[members[3]][1].shape[0] if 3 in members else 4 * first_up.shape[0]]
            if tuple(dims) != FLUX1_SINGLE_DIMS:
                raise UserError(f"single-block LoRA of a {dims[0]}-wide FLUX transformer: diffusers' kohya loader "
                                f"only reads FLUX.1's {FLUX1_SINGLE_DIMS[0]}-wide single blocks; export --format "
                                "diffusers, or train without single-block target modules")
        else:
            dims = [first_up.shape[0]] * parts
        scales = {alphas[n] / modules[n][0].shape[0] for n in members.values()}
        same_scale = len(scales) == 1 and all(modules[n][0].shape[0] == rank for n in members.values())
        downs, ups = [], []
        for part in range(parts):
            if part in members:
                down, up = modules[members[part]]
                scale = 1.0 if same_scale else alphas[members[part]] / down.shape[0]
                downs.append(down)
                ups.append(up * scale if scale != 1.0 else up)
            else:  # a part without LoRA: zero blocks keep the update (and the stacked layout) exact
                downs.append(first_down.new_zeros(rank, in_features))
                ups.append(first_up.new_zeros(dims[part], rank))
        total = sum(d.shape[0] for d in downs)
        out[f"{target}.lora_down.weight"] = torch.cat(downs, dim=0)
        out[f"{target}.lora_up.weight"] = torch.block_diag(*ups)
        out[f"{target}.alpha"] = torch.tensor(scales.pop() * total if same_scale else float(total))
    return out


# ----------------------------------------------------------------------------- export
def to_kohya(state: dict[str, torch.Tensor], header: dict[str, str], family: str | None = None,
             file: str = "LoRA") -> dict[str, torch.Tensor]:
    """kohya-format tensors (with `.alpha` per module) of a diffusers-format LoRA state dict and header."""
    import torch

    family = family or detect_family(state, header, file)
    if family not in KOHYA_FAMILIES:
        raise UserError(f"kohya export is for the {', '.join(KOHYA_FAMILIES)} families, not '{family}'; "
                        "use --format diffusers")
    saved = header.get(FAMILY_HEADER_KEY)
    if saved and saved != family:
        raise UserError(f"'{file}' was saved for the {saved} family, not {family}")
    network = KOHYA_FAMILIES[family]
    modules = _modules(state, network, file)
    alphas = module_scales(modules, _adapter_config(header, network, file), file)
    if family == "flux":
        return _flux_kohya(modules, alphas)
    from diffusers.utils import convert_state_dict_to_kohya

    # diffusers' kohya loader for SD/SDXL reads one alpha for all modules (per-module alphas are mis-named
    # there), so modules with another alpha get the ratio folded into lora_up: the same update for every reader
    common = Counter(alphas.values()).most_common(1)[0][0]
    peft_state = {}
    for name, (down, up) in modules.items():
        ratio = alphas[name] / common
        peft_state[f"unet.{name}.lora_A.weight"] = down
        peft_state[f"unet.{name}.lora_B.weight"] = up * ratio if ratio != 1.0 else up
    out = convert_state_dict_to_kohya(peft_state)
    for name in modules:  # diffusers writes alpha = rank; the adapter's alpha keeps its scale
        out[f"lora_unet_{name.replace('.', '_')}.alpha"] = torch.tensor(common)
    return out


def export_lora(src: str | Path, out: str | Path, fmt: str = "kohya", family: str | None = None) -> Path:
    """Write the LoRA at `src` (a folder or .safetensors file) to `out` in `fmt` (kohya or diffusers)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out '{out}': give a .safetensors file name")
    state, header = read_lora(src)
    file = str(lora_file(src))
    if fmt == "kohya":
        tensors = to_kohya(state, header, family, file)
        meta = {"format": "pt", "ss_network_module": "networks.lora"}
    elif fmt == "diffusers":
        tensors, meta = state, header
    else:
        raise UserError(f"unknown format '{fmt}': kohya or diffusers")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=meta)
    return out
