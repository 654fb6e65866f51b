"""Sampling from toy models and turning samples into Pick-a-Pic v2 style preference data.

`write_pairs` samples two images per prompt from a model (fixed seeds), labels each pair with the
oracle (the higher reward wins; ties and pairs closer than `min_margin` get label 0.5, which the loader
drops by default, as Pick-a-Pic's ties; optional label noise flips a label with probability
`label_noise`), and writes a parquet with the Pick-a-Pic v2 columns `jpg_0`, `jpg_1` (JPEG bytes),
`label_0`, `label_1`, `caption`, plus `caption_0` / `caption_1` (what the oracle sees in each image: the
per-image captions of DCPO data) and `reward_0` / `reward_1`, `split`, `seed_0`, `seed_1`.
"""

from __future__ import annotations

import copy
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from diffusion_po.toy.worlds import ToyWorld, get_world

DEFAULT_STEPS = 10
DEFAULT_SCALE = 4.0
DEFAULT_SCHEDULER = "dpm++"


def load_pipeline(path: str | Path, unet: str | Path | None = None, lora: str | Path | None = None):
    """A toy pipeline in fp32 on the CPU; `unet` swaps in a fine-tuned UNet folder, `lora` loads LoRA weights."""
    import torch

    from diffusion_po.families import load_pipeline as _load

    pipe = _load(str(path))
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        if module.dtype != torch.float32:
            module.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if unet is not None or lora is not None:
        pipe = with_unet(pipe, unet, lora)
    return pipe


def with_unet(pipe: Any, unet: str | Path | None = None, lora: str | Path | None = None) -> Any:
    """A copy of `pipe` sharing everything but the UNet: a fine-tuned one from `unet`, or the base plus `lora`."""
    from diffusers import UNet2DConditionModel

    if unet is not None:
        net = UNet2DConditionModel.from_pretrained(str(unet)).float().eval()
    else:
        net = copy.deepcopy(pipe.unet)
    components = dict(pipe.components)
    components["unet"] = net
    if "safety_checker" in components:
        components["requires_safety_checker"] = False
    new = type(pipe)(**components)
    new.set_progress_bar_config(disable=True)
    if lora is not None:
        from diffusion_po.sampling.negative import load_positive_lora

        load_positive_lora(new, str(lora))
    return new


def sample(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int = DEFAULT_STEPS,
           scale: float = DEFAULT_SCALE, batch_size: int = 64, progress: bool = False,
           desc: str | None = None) -> list[Image.Image]:
    """One image per (prompt, seed) with classifier-free guidance (DPM-Solver++), in input order."""
    from diffusion_po.sampling import generate

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images: list[Image.Image] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=desc or "sampling", unit="img")
    for i in range(0, len(prompts), batch_size):
        chunk = generate(pipe, list(prompts[i : i + batch_size]), seeds=list(seeds[i : i + batch_size]),
                         guidance="cfg", scale=scale, steps=steps, batch_size=batch_size,
                         scheduler=DEFAULT_SCHEDULER)
        images.extend(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return images


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    """JPEG bytes without chroma subsampling (colour edges of 32x32 images survive)."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


@dataclass
class PairsSummary:
    path: Path
    rows: int
    ties: int
    flipped: int
    mean_reward: float
    mean_margin: float
    oracle_agreement: float
    """Fraction of non-tie labels that agree with the oracle (1 - the realised label noise)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def write_pairs(pipe: Any, out: str | Path, n_prompts: int, seed: int = 0, split: str = "train",
                label_noise: float = 0.0, min_margin: float = 0.0, steps: int = DEFAULT_STEPS,
                scale: float = DEFAULT_SCALE, batch_size: int = 64, progress: bool = True,
                world: str | ToyWorld | None = None, samples_per_prompt: int = 2) -> PairsSummary:
    """Sample `samples_per_prompt` (K) images for each of `n_prompts` prompts of `split` of toy world `world`
    (default: the compositional one), label them with its oracle and write parquet: with K = 2 the two
    images are the pair; with K > 2 the pair is the best and the worst of the K (in sample order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5), got {label_noise}")
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be at least 2, got {samples_per_prompt}")
    n_samples = samples_per_prompt
    toy_world = get_world(world)
    prompts = toy_world.prompts(n_prompts, seed, split=split)
    seeds = [[seed * 1_000_003 + n_samples * i + j for i in range(n_prompts)] for j in range(n_samples)]
    images = sample(pipe, prompts * n_samples, [s for block in seeds for s in block], steps, scale, batch_size, progress,
                    desc="toy pairs: sampling")
    rng = random.Random(seed + 17)
    rows: dict[str, list] = {k: [] for k in ("jpg_0", "jpg_1", "label_0", "label_1", "caption", "caption_0",
                                             "caption_1", "reward_0", "reward_1", "split", "seed_0", "seed_1")}
    ties = flipped = agree = decided = 0
    margins = []
    for i, prompt in enumerate(prompts):
        # score the JPEG-decoded images: exactly what the trainer will see
        jpegs = [jpeg_bytes(images[j * n_prompts + i]) for j in range(n_samples)]
        decoded = [Image.open(io.BytesIO(jp)) for jp in jpegs]
        results = [toy_world.score(im, prompt) for im in decoded]
        rewards = [r.reward for r in results]
        best, worst = rewards.index(max(rewards)), rewards.index(min(rewards))
        first, second = (0, 1) if best == worst else sorted((best, worst))
        ja, jb, ia, ib, ra, rb = jpegs[first], jpegs[second], decoded[first], decoded[second], results[first], results[second]
        s0, s1 = seeds[first][i], seeds[second][i]
        margin = ra.reward - rb.reward
        margins.append(abs(margin))
        if abs(margin) <= min_margin or margin == 0:
            label0 = 0.5
            ties += 1
        else:
            label0 = 1.0 if margin > 0 else 0.0
            if label_noise > 0 and rng.random() < label_noise:
                label0 = 1.0 - label0
                flipped += 1
            decided += 1
            agree += int((label0 == 1.0) == (margin > 0))
        rows["jpg_0"].append(ja)
        rows["jpg_1"].append(jb)
        rows["label_0"].append(label0)
        rows["label_1"].append(1.0 - label0)
        rows["caption"].append(prompt)
        rows["caption_0"].append(toy_world.describe(ia, prompt))
        rows["caption_1"].append(toy_world.describe(ib, prompt))
        rows["reward_0"].append(ra.reward)
        rows["reward_1"].append(rb.reward)
        rows["split"].append(split)
        rows["seed_0"].append(s0)
        rows["seed_1"].append(s1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        **{k: pa.array(v, pa.binary()) for k, v in rows.items() if k.startswith("jpg")},
        **{k: pa.array(v, pa.float64()) for k, v in rows.items() if k.startswith(("label", "reward"))},
        **{k: pa.array(v, pa.string()) for k, v in rows.items() if k.startswith(("caption", "split"))},
        **{k: pa.array(v, pa.int64()) for k, v in rows.items() if k.startswith("seed")},
    })
    pq.write_table(table, out)
    rewards = rows["reward_0"] + rows["reward_1"]
    return PairsSummary(out, n_prompts, ties, flipped, sum(rewards) / len(rewards), sum(margins) / len(margins),
                        agree / decided if decided else float("nan"))


def summarize_pairs(path: str | Path) -> PairsSummary:
    """The summary of an existing toy pairs parquet (flips are unknown there: counted as 0)."""
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["label_0", "reward_0", "reward_1"]).to_pydict()
    labels, r0, r1 = t["label_0"], t["reward_0"], t["reward_1"]
    ties = sum(1 for x in labels if x == 0.5)
    decided = [(x, a - b) for x, a, b in zip(labels, r0, r1) if x != 0.5]
    agree = sum(1 for x, m in decided if (x == 1.0) == (m > 0))
    margins = [abs(a - b) for a, b in zip(r0, r1)]
    return PairsSummary(Path(path), len(labels), ties, len(decided) - agree, (sum(r0) + sum(r1)) / (2 * len(r0)),
                        sum(margins) / len(margins), agree / len(decided) if decided else float("nan"))


def read_pairs(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a toy pairs parquet as dicts (images decoded to PIL)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["image_0"] = Image.open(io.BytesIO(r["jpg_0"])).convert("RGB")
        r["image_1"] = Image.open(io.BytesIO(r["jpg_1"])).convert("RGB")
    return rows


__all__ = ["PairsSummary", "jpeg_bytes", "load_pipeline", "read_pairs", "sample", "summarize_pairs", "with_unet",
           "write_pairs"]
