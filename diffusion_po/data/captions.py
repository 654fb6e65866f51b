"""DCPO caption preparation: give each image of a preference pair its own caption (the Pick-Double-Caption
layout: `caption_k` describes `jpg_k`).

Strategies (Saeidi et al., arXiv 2502.06023, Fig. 2), with z_w / z_l the captions of the preferred /
less-preferred image and c the pair's prompt:

- `captioning` (DCPO-c): z_w = caption(x_w, c), z_l = caption(x_l, c) by a captioning model;
- `perturbation` (DCPO-p): z_w = c, z_l = perturb(c);
- `hybrid` (DCPO-h): z_w = caption(x_w, c), z_l = perturb(caption(x_l, c)).

A captioner is any callable `captioner(images, prompts) -> captions`; `TransformersCaptioner(path)` wraps
an image-to-text model of transformers (BLIP, LLaVA, ... any `AutoModelForImageTextToText`). A perturber
is any callable `perturb(texts) -> texts`: `RulePerturber` needs no model (swaps colours, counts, sizes,
positions, materials, styles ... and drops details), `TransformersParaphraser(path)` wraps a seq2seq or
causal LM (e.g. the DIPPER paraphraser with `--paraphraser-template dipper`).

Input: Pick-a-Pic-style parquet files (jpg_0, jpg_1, label_0, caption). Output: the same rows with
`caption_0` and `caption_1` added, ready for `data.format: dcpo`.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffusion_po.errors import DataError, ModelLoadError, UserError

Captioner = Callable[[list[Any], list[str]], list[str]]
Perturber = Callable[[list[str]], list[str]]
STRATEGIES = ("captioning", "perturbation", "hybrid")
STRENGTHS = {"weak": 1, "medium": 2, "strong": 4}
# DIPPER's lexical control code per strength. DIPPER's codes are 100 - diversity: the DCPO repo's
# weak/medium/strong lexical diversity 40/60/80 with order diversity 0 is written as lexical = 60/40/20,
# order = 100, with its prefix inside the input (DCPO-T2I src/perturb_caption.py, as the official DIPPER code)
DIPPER_LEXICAL = {"weak": 60, "medium": 40, "strong": 20}
DCPO_PREFIX = "Paraphrase and perturb the following image caption."
TEMPLATES = {
    "dipper": "lexical = {lexical}, order = 100 " + DCPO_PREFIX + " <sent> {text} </sent>",
    "plain": "Paraphrase and perturb the following image caption: {text}",
}
DEFAULT_CAPTION_PROMPT = (
    'Write a one-sentence caption of this image, which was generated for the prompt "{prompt}".'
)

# ----------------------------------------------------------------------------- rule-based perturbation
_SWAP_GROUPS: list[list[str]] = [
    ["red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white", "brown", "gray", "golden", "silver"],
    ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
    ["small", "large", "tiny", "huge", "giant", "little", "big"],
    ["left", "right"], ["above", "below"], ["top", "bottom"], ["front", "back"], ["inside", "outside"],
    ["day", "night"], ["morning", "evening"], ["summer", "winter"], ["sunny", "rainy", "snowy", "foggy"],
    ["wooden", "metal", "glass", "stone", "plastic", "paper"],
    ["photo", "painting", "drawing", "sketch", "cartoon", "render", "illustration", "sculpture"],
    ["realistic", "abstract", "surreal", "minimalist"],
    ["old", "young", "new"], ["happy", "sad", "angry"], ["bright", "dark"], ["hot", "cold"],
    ["man", "woman", "child"], ["boy", "girl"], ["cat", "dog", "horse", "bird", "rabbit", "fox"],
    ["city", "forest", "desert", "beach", "mountain", "village"], ["sitting", "standing", "running", "sleeping"],
    ["beautiful", "ugly"], ["detailed", "blurry"], ["colorful", "monochrome"],
]
_SWAP = {w: group for group in _SWAP_GROUPS for w in group}
_STOP = {"a", "an", "the", "of", "and", "in", "on", "with", "at", "to", "by", "for", "is", "are", "its", "his", "her"}
_WORD = re.compile(r"[A-Za-z]+|\d+|[^A-Za-z\d]+")


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def perturb_text(text: str, edits: int, rng: random.Random) -> str:
    """Apply `edits` semantic edits to `text`: swap a word for another of its kind (colour, number, size,
    position, material, style, animal, ...), else change a digit, else drop a content word. The result
    always differs from the input (a last resort adds a contradicting modifier)."""
    tokens = _WORD.findall(text)
    for _ in range(max(1, edits)):
        words = [i for i, tok in enumerate(tokens) if tok.isalpha() or tok.isdigit()]
        swappable = [i for i in words if tokens[i].lower() in _SWAP]
        digits = [i for i in words if tokens[i].isdigit()]
        content = [i for i in words if tokens[i].lower() not in _STOP]
        if swappable:
            i = rng.choice(swappable)
            group = _SWAP[tokens[i].lower()]
            tokens[i] = _match_case(rng.choice([w for w in group if w != tokens[i].lower()]), tokens[i])
        elif digits:
            i = rng.choice(digits)
            tokens[i] = str(int(tokens[i]) + rng.randint(1, 9))
        elif len(content) > 1:
            i = rng.choice(content)
            tokens[i] = ""
        else:
            break
    out = re.sub(r"\s{2,}", " ", "".join(tokens)).strip()
    if out == text.strip() or not out:
        out = f"{rng.choice(['blurry', 'distorted', 'dull'])} {text.strip()}"
    return out


class RulePerturber:
    """Model-free perturbation; `strength` weak/medium/strong = 1/2/4 edits; deterministic given `seed`."""

    def __init__(self, strength: str = "medium", seed: int = 0):
        if strength not in STRENGTHS:
            raise UserError(f"strength must be one of {', '.join(STRENGTHS)}")
        self.edits = STRENGTHS[strength]
        self.seed = seed

    def __call__(self, texts: list[str]) -> list[str]:
        return [perturb_text(t, self.edits, random.Random(f"{self.seed}-{t}")) for t in texts]


# ----------------------------------------------------------------------------- transformers wrappers
def _device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class TransformersCaptioner:
    """An image-to-text model of transformers, loaded by path (BLIP, LLaVA, Florence, ...).

    `prompt_template` ({prompt} is the pair's prompt) is sent to instruction models through the processor's
    chat template; for plain captioners (no chat template) pass `prompt_template=""` to caption unconditioned.
    """

    def __init__(self, path: str, prompt_template: str | None = DEFAULT_CAPTION_PROMPT, device: str | None = None,
                 max_new_tokens: int = 60):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = _device(device)
        try:
            self.processor = AutoProcessor.from_pretrained(path)
            self.model = AutoModelForImageTextToText.from_pretrained(path)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"could not load captioner '{path}': {str(exc).splitlines()[0]}") from exc
        self.model.to(self.device).eval()
        self.prompt_template = prompt_template
        self.max_new_tokens = max_new_tokens
        self.chat = getattr(self.processor, "chat_template", None) is not None
        self.empty = 0
        self._torch = torch

    def _texts(self, prompts: list[str]) -> list[str] | None:
        if not self.prompt_template:
            return None
        texts = [self.prompt_template.format(prompt=p) for p in prompts]
        if self.chat:
            return [self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                add_generation_prompt=True) for t in texts]
        return texts

    def __call__(self, images: list[Any], prompts: list[str]) -> list[str]:
        texts = self._texts(prompts)
        kwargs = {"images": images, "return_tensors": "pt"}
        if texts is not None:
            kwargs.update(text=texts, padding=True)
        inputs = self.processor(**kwargs).to(self.device)
        with self._torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if self.chat and "input_ids" in inputs and not self.model.config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1]:]
        decoded = self.processor.batch_decode(out, skip_special_tokens=True)
        captions = []
        for text, prefix, prompt in zip(decoded, texts or [None] * len(decoded), prompts):
            text = text.strip()
            if prefix and text.lower().startswith(prefix.strip().lower()):
                text = text[len(prefix.strip()):].strip()
            if not text:  # nothing generated: keep the prompt rather than an empty caption, and count it
                self.empty += 1
                text = prompt
            captions.append(text)
        return captions


class TransformersParaphraser:
    """A seq2seq (T5, DIPPER, BART) or causal LM loaded by path that rewrites captions.

    `template` is 'dipper' (the DCPO repo's DIPPER input "lexical = L, order = 100 <prefix> <sent> text
    </sent>", L = 100 - diversity from the strength: 60/40/20), 'plain', or any string with {text} (and
    optionally {lexical}). Sampling with top_p 0.75 as the DCPO repo.
    """

    def __init__(self, path: str, template: str = "plain", strength: str = "medium", device: str | None = None,
                 max_new_tokens: int = 128, seed: int = 0, top_p: float = 0.75):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        self.device = _device(device)
        try:
            config = AutoConfig.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            self.model = cls.from_pretrained(path)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"could not load paraphraser '{path}': {str(exc).splitlines()[0]}") from exc
        self.model.to(self.device).eval()
        self.seq2seq = bool(config.is_encoder_decoder)
        self.template = TEMPLATES.get(template, template)
        if "{text}" not in self.template:
            raise UserError("the paraphraser template needs a {text} placeholder (or 'dipper' / 'plain')")
        self.lexical = DIPPER_LEXICAL.get(strength, 60)
        self.max_new_tokens, self.top_p, self.seed = max_new_tokens, top_p, seed
        self._torch = torch
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def inputs(self, texts: list[str]) -> list[str]:
        """The model's input text for each caption."""
        return [self.template.format(text=t, lexical=self.lexical) for t in texts]

    def __call__(self, texts: list[str]) -> list[str]:
        inputs = self.inputs(texts)
        enc = self.tokenizer(inputs, return_tensors="pt", padding=True, truncation=True).to(self.device)
        self._torch.manual_seed(self.seed)
        with self._torch.no_grad():
            out = self.model.generate(**enc, do_sample=True, top_p=self.top_p, max_new_tokens=self.max_new_tokens)
        if not self.seq2seq:
            out = out[:, enc["input_ids"].shape[1]:]
        decoded = [d.strip() for d in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return [d if d else t for d, t in zip(decoded, texts)]


# ----------------------------------------------------------------------------- the strategies
def double_captions(
    strategy: str,
    prompts: Sequence[str],
    labels: Sequence[float | None],
    images_0: Sequence[Any] | None = None,
    images_1: Sequence[Any] | None = None,
    captioner: Captioner | None = None,
    perturber: Perturber | None = None,
) -> tuple[list[str], list[str]]:
    """(caption_0, caption_1) for a batch of pairs. `labels` are label_0 (1: jpg_0 preferred, 0: jpg_1;
    a tie 0.5 counts jpg_0 as preferred, as the loader does); images are PIL images (captioning/hybrid)."""
    if strategy not in STRATEGIES:
        raise UserError(f"strategy must be one of {', '.join(STRATEGIES)}")
    prompts = list(prompts)
    n = len(prompts)
    if strategy in ("captioning", "hybrid"):
        if captioner is None:
            raise UserError(f"strategy '{strategy}' needs a captioner (--captioner PATH)")
        if images_0 is None or images_1 is None:
            raise UserError(f"strategy '{strategy}' needs the images")
        cap_0 = captioner(list(images_0), prompts)
        cap_1 = captioner(list(images_1), prompts)
        if len(cap_0) != n or len(cap_1) != n:
            raise ValueError("the captioner returned a different number of captions than images")
        if strategy == "captioning":
            return list(cap_0), list(cap_1)
    if perturber is None:
        raise UserError(f"strategy '{strategy}' needs a perturber (a paraphraser path, or the rule-based one)")
    first_preferred = []
    for i, label in enumerate(labels):
        if label is None:
            raise DataError(f"pair {i}: strategy '{strategy}' needs label_0 to know which image is preferred")
        first_preferred.append(float(label) >= 0.5)
    if strategy == "perturbation":
        winners = prompts
        to_perturb = prompts
    else:  # hybrid: the loser's generated caption is perturbed; the winner keeps its generated caption
        winners = [c0 if f else c1 for f, c0, c1 in zip(first_preferred, cap_0, cap_1)]
        to_perturb = [c1 if f else c0 for f, c0, c1 in zip(first_preferred, cap_0, cap_1)]
    losers = list(perturber(list(to_perturb)))
    if len(losers) != n:
        raise ValueError("the perturber returned a different number of texts")
    caption_0 = [w if f else lo for f, w, lo in zip(first_preferred, winners, losers)]
    caption_1 = [lo if f else w for f, w, lo in zip(first_preferred, winners, losers)]
    return caption_0, caption_1


def prepare_captions(
    inputs: Sequence[str],
    output: str | Path,
    strategy: str,
    captioner: Captioner | None = None,
    perturber: Perturber | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Read Pick-a-Pic-style parquet files, add `caption_0`/`caption_1`, write parquet. `output` is a
    .parquet file (one input) or a folder (one file per input, same names). Returns the written files."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from diffusion_po.data.preference import decode_image

    files = _expand(inputs)
    output = Path(output)
    if output.suffix == ".parquet" and len(files) > 1:
        raise UserError("several inputs need an output folder, not a .parquet file")
    targets = [output] if output.suffix == ".parquet" else [output / Path(f).name for f in files]
    need_images = strategy in ("captioning", "hybrid")
    written, done = [], 0
    bar = tqdm(total=limit, desc=f"captions ({strategy})", unit="pair", disable=not progress)
    for src, dst in zip(files, targets):
        pf = pq.ParquetFile(src)
        names = pf.schema_arrow.names
        required = ["caption"] + (["jpg_0", "jpg_1"] if need_images else []) + \
            (["label_0"] if strategy != "captioning" else [])
        missing = [c for c in required if c not in names]
        if missing:
            raise DataError(f"{src}: needs column(s) {', '.join(missing)} for strategy '{strategy}'; found {', '.join(names)}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        writer = None
        try:
            for rb in pf.iter_batches(batch_size=batch_size):
                if limit is not None and done >= limit:
                    break
                if limit is not None and done + rb.num_rows > limit:
                    rb = rb.slice(0, limit - done)
                table = pa.Table.from_batches([rb])
                cols = table.to_pydict()
                prompts = [c if isinstance(c, str) else "" for c in cols["caption"]]
                labels = cols.get("label_0", [None] * len(prompts))
                im0 = im1 = None
                if need_images:
                    try:
                        im0 = [decode_image(v) for v in cols["jpg_0"]]
                        im1 = [decode_image(v) for v in cols["jpg_1"]]
                    except Exception as exc:
                        raise DataError(f"{src}: undecodable image near row {done}: {exc}") from exc
                c0, c1 = double_captions(strategy, prompts, labels, im0, im1, captioner, perturber)
                for name, values in (("caption_0", c0), ("caption_1", c1)):
                    if name in table.column_names:
                        table = table.drop_columns([name])
                    table = table.append_column(name, pa.array(values, pa.string()))
                if writer is None:
                    writer = pq.ParquetWriter(str(dst), table.schema)
                writer.write_table(table)
                done += table.num_rows
                bar.update(table.num_rows)
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            written.append(dst)
    bar.close()
    return written


def _expand(patterns: Sequence[str]) -> list[str]:
    import glob

    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser())))
        if not matches:
            raise DataError(f"input not found: {pattern}")
        files.extend(matches)
    bad = [f for f in files if not f.endswith(".parquet")]
    if bad:
        raise DataError(f"inputs must be parquet files (Pick-a-Pic layout); got {bad[0]}")
    return files


# ----------------------------------------------------------------------------- CLI
def register_captions(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `captions` (as in `diffusion-po data captions`) to a subparsers object."""
    p = subparsers.add_parser(
        "captions", help="DCPO: write per-image captions (caption_0/caption_1) for preference pairs",
        description=(
            "Give each image of a Pick-a-Pic pair its own caption for DCPO. captioning: a captioner describes both "
            "images; perturbation: the preferred image keeps the prompt and the other gets a perturbed prompt; hybrid: "
            "both are captioned and the less-preferred caption is perturbed. Perturbation uses --paraphraser PATH "
            "(a seq2seq/causal LM), or the built-in rule-based perturbation without one."
        ),
    )
    p.add_argument("inputs", nargs="+", help="parquet files or globs (jpg_0, jpg_1, label_0, caption)")
    p.add_argument("--output", "-o", required=True, help="a .parquet file (one input) or a folder")
    p.add_argument("--strategy", choices=STRATEGIES, default="perturbation")
    p.add_argument("--captioner", help="path/hub id of a transformers image-to-text model (BLIP, LLaVA, ...)")
    p.add_argument("--captioner-prompt", default=DEFAULT_CAPTION_PROMPT,
                   help="instruction for chat captioners, {prompt} = the pair's prompt; '' for none")
    p.add_argument("--paraphraser", help="path/hub id of a seq2seq or causal LM (e.g. a DIPPER checkpoint); "
                                         "without it the rule-based perturbation is used")
    p.add_argument("--paraphraser-template", default="plain", help="'dipper', 'plain' or a string with {text}")
    p.add_argument("--strength", choices=sorted(STRENGTHS), default="medium", help="perturbation strength")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="stop after this many pairs")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_captions)
    return p


def run_captions(args: argparse.Namespace) -> int:
    captioner = perturber = None
    if args.strategy in ("captioning", "hybrid"):
        if not args.captioner:
            raise UserError(f"--strategy {args.strategy} needs --captioner PATH (a transformers image-to-text model)")
        captioner = TransformersCaptioner(args.captioner, args.captioner_prompt or None, args.device)
    if args.strategy in ("perturbation", "hybrid"):
        if args.paraphraser:
            perturber = TransformersParaphraser(args.paraphraser, args.paraphraser_template, args.strength,
                                                args.device, seed=args.seed)
        else:
            perturber = RulePerturber(args.strength, args.seed)
    written = prepare_captions(args.inputs, args.output, args.strategy, captioner, perturber,
                               batch_size=args.batch_size, limit=args.limit)
    if captioner is not None and captioner.empty:
        print(f"warning: the captioner produced {captioner.empty} empty captions; the prompt was kept for those")
    print(f"wrote {', '.join(map(str, written))} (data.format: dcpo)")
    return 0
