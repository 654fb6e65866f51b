"""DCPO caption preparation (rule-based perturbation, the three strategies, transformers captioner and
paraphraser by path on tiny random models) and DRO expert selection (top-N by a scorer callable)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from diffusion_po.data import captions as C
from diffusion_po.data import experts as E
from diffusion_po.errors import DataError, UserError
from tests.helpers import RGB, write_pickapic

torch.set_num_threads(1)


def colour_of(image) -> str:
    """A fake 'captioner': names the colour nearest to the image's mean."""
    mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0)
    return min(RGB, key=lambda c: float(((np.array(RGB[c]) - mean) ** 2).sum()))


def fake_captioner(images, prompts):
    return [f"a {colour_of(im)} square" for im in images]


def test_rule_perturbation():
    p = C.RulePerturber("weak", seed=0)
    out = p(["a red cat sitting on the left of two wooden boxes"])[0]
    assert out != "a red cat sitting on the left of two wooden boxes"
    assert p(["a red cat"]) == p(["a red cat"])  # deterministic
    assert C.perturb_text("A Red square", 1, random.Random(0)).split()[1] in {
        w.capitalize() for w in C._SWAP_GROUPS[0] if w != "red"}
    # no word of any known kind: a content word is dropped; a single word still changes
    assert C.perturb_text("gigantic zebra spaceship", 1, random.Random(0)) != "gigantic zebra spaceship"
    assert C.perturb_text("zebra", 3, random.Random(0)) != "zebra"
    strong = C.RulePerturber("strong", seed=1)(["a red cat on the left of a blue house at night"])[0]
    changed = sum(a != b for a, b in zip(strong.split(), "a red cat on the left of a blue house at night".split()))
    assert changed >= 2
    with pytest.raises(UserError):
        C.RulePerturber("huge")


def test_double_captions_strategies():
    prompts, labels = ["p0", "p1", "p2"], [1.0, 0.0, 0.5]
    im0, im1 = ["A0", "A1", "A2"], ["B0", "B1", "B2"]

    def cap(images, prompts):
        return [f"cap({i})" for i in images]

    def pert(texts):
        return [f"~{t}" for t in texts]

    c0, c1 = C.double_captions("perturbation", prompts, labels, perturber=pert)
    # the preferred image keeps the prompt, the other gets the perturbed prompt; a tie: jpg_0 preferred
    assert c0 == ["p0", "~p1", "p2"] and c1 == ["~p0", "p1", "~p2"]
    c0, c1 = C.double_captions("captioning", prompts, [None] * 3, im0, im1, captioner=cap)
    assert c0 == ["cap(A0)", "cap(A1)", "cap(A2)"] and c1 == ["cap(B0)", "cap(B1)", "cap(B2)"]
    c0, c1 = C.double_captions("hybrid", prompts, labels, im0, im1, captioner=cap, perturber=pert)
    assert c0 == ["cap(A0)", "~cap(A1)", "cap(A2)"] and c1 == ["~cap(B0)", "cap(B1)", "~cap(B2)"]
    with pytest.raises(DataError, match="label_0"):
        C.double_captions("perturbation", prompts, [None] * 3, perturber=pert)
    with pytest.raises(UserError, match="captioner"):
        C.double_captions("captioning", prompts, labels, im0, im1)


def test_prepare_captions_file_layout_and_dcpo_loading(tmp_path):
    src = write_pickapic(tmp_path / "pp.parquet", n=6, drop_columns=["caption_0", "caption_1"])
    out = C.prepare_captions([str(src)], tmp_path / "dc.parquet", "captioning", captioner=fake_captioner,
                             batch_size=4, progress=False)
    table = pq.read_table(out[0]).to_pydict()
    original = pq.read_table(src).to_pydict()
    assert set(original) <= set(table) and len(table["caption_0"]) == 6
    from diffusion_po.data.preference import decode_image

    for i in range(6):  # caption_k describes jpg_k
        assert table["caption_0"][i] == f"a {colour_of(decode_image(table['jpg_0'][i]))} square"
        assert table["caption_1"][i] == f"a {colour_of(decode_image(table['jpg_1'][i]))} square"
    # the trainer's dcpo loader reads it; the winner gets its own caption
    from diffusion_po.config import DataConfig
    from diffusion_po.data import build_train_data

    data = build_train_data(DataConfig(format="dcpo", data_files=[str(out[0])], random_flip=False), 32, 2, 0, 1, 0)
    batch = next(iter(data.loader))
    for k in range(batch["size"]):
        assert batch["captions_w"][k] == batch["captions"][k]  # helpers: the prompt names the winner's colour
        assert batch["captions_l"][k] != batch["captions_w"][k]
    # perturbation via the CLI entry point, with a limit
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    C.register_captions(sub)
    args = parser.parse_args(["captions", str(src), "-o", str(tmp_path / "p"), "--strategy", "perturbation",
                              "--limit", "3", "--strength", "strong"])
    assert args.func(args) == 0
    t2 = pq.read_table(tmp_path / "p" / "pp.parquet").to_pydict()
    assert len(t2["caption_0"]) == 3
    for i in range(3):
        win, lose = (t2["caption_0"][i], t2["caption_1"][i]) if t2["label_0"][i] >= 0.5 else (t2["caption_1"][i], t2["caption_0"][i])
        assert win == t2["caption"][i] and lose != win
    with pytest.raises(DataError, match="label_0"):
        C.prepare_captions([str(write_pickapic(tmp_path / "nolabel.parquet", n=2, drop_columns=["label_0"]))],
                           tmp_path / "x.parquet", "perturbation", perturber=C.RulePerturber(), progress=False)


def _tiny_blip(folder: Path) -> Path:
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "square", "photo", "of", "[DEC]"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(folder)
    torch.manual_seed(0)
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=64, bos_token_id=len(words) - 1, pad_token_id=0, sep_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(folder)
    return folder


def _tiny_t5(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "green", "square", "lexical", "=", "order", "<sent>",
             "</sent>", ",", "0", "20", "40", "60", "100", "Paraphrase", "and", "perturb", "the", "following",
             "image", "caption:", "caption."]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(words), d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1,
                                        num_heads=2, d_kv=16, decoder_start_token_id=0, pad_token_id=0,
                                        eos_token_id=1)).save_pretrained(folder)
    return folder


def test_transformers_captioner_and_paraphraser_by_path(tmp_path):
    """The pluggable models load by path and run through the hybrid strategy (random tiny weights, so only
    the plumbing is checked: one string per image, the winner keeps its caption, the loser's changes)."""
    blip = _tiny_blip(tmp_path / "blip")
    t5 = _tiny_t5(tmp_path / "t5")
    src = write_pickapic(tmp_path / "pp.parquet", n=2, drop_columns=["caption_0", "caption_1"])
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    C.register_captions(sub)
    args = parser.parse_args(["captions", str(src), "-o", str(tmp_path / "h.parquet"), "--strategy", "hybrid",
                              "--captioner", str(blip), "--captioner-prompt", "a photo of",
                              "--paraphraser", str(t5), "--paraphraser-template", "dipper", "--device", "cpu"])
    assert args.func(args) == 0
    table = pq.read_table(tmp_path / "h.parquet").to_pydict()
    assert all(isinstance(c, str) and c for c in table["caption_0"] + table["caption_1"])
    para = C.TransformersParaphraser(str(t5), "dipper", "weak")
    assert len(para(["a red square", "a blue square"])) == 2
    with pytest.raises(Exception, match="could not load"):
        C.TransformersCaptioner(str(tmp_path / "missing"))


def test_dipper_input_is_the_dcpo_repos(tmp_path):
    """DCPO-T2I perturb_caption.py: DIPPER's control codes are 100 - diversity (weak/medium/strong lexical
    diversity 40/60/80 -> lexical = 60/40/20; order diversity 0 -> order = 100), the prefix inside the input."""
    t5 = _tiny_t5(tmp_path / "t5")
    prefix = "Paraphrase and perturb the following image caption."
    for strength, code in [("weak", 60), ("medium", 40), ("strong", 20)]:
        para = C.TransformersParaphraser(str(t5), "dipper", strength)
        assert para.inputs(["a red square"]) == [f"lexical = {code}, order = 100 {prefix} <sent> a red square </sent>"]


def redness(images, prompts):
    return [float(np.asarray(im, dtype=np.float32)[..., 0].mean() - np.asarray(im, dtype=np.float32)[..., 1:].mean())
            for im in images]


def test_select_top_experts(tmp_path):
    src = write_pickapic(tmp_path / "pp.parquet", n=8)
    dup = write_pickapic(tmp_path / "pp_dup.parquet", n=8)  # identical rows: deduplicated by content + caption
    out = E.select_top_experts([str(src), str(dup)], redness, top_n=3, output=tmp_path / "experts", progress=False)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    # the kept ones are the reddest of all 16 distinct (image, caption) candidates
    from diffusion_po.data.preference import decode_image

    table = pq.read_table(src).to_pydict()
    all_scores = sorted((s for k in ("jpg_0", "jpg_1") for s in redness([decode_image(v) for v in table[k]], [])),
                        reverse=True)
    assert scores == pytest.approx(all_scores[:3], rel=1e-5)
    info = json.loads((tmp_path / "experts" / "selection.json").read_text())
    assert info["scored"] == 16
    assert all((tmp_path / "experts" / r["image"]).is_file() for r in rows)
    # the images data format reads the selection
    from diffusion_po.config import DataConfig
    from diffusion_po.data import build_train_data

    data = build_train_data(DataConfig(format="images", data_files=[str(out)]), 32, 3, 0, 1, 0)
    batch = next(iter(data.loader))
    assert batch["size"] == 3 and batch["pixels"].shape == (3, 3, 32, 32)
    # a scorer given as module:function, and bad input
    fn = E.load_score_fn("tests.test_objectives_data:redness")
    assert fn is redness
    with pytest.raises(UserError):
        E.load_score_fn("tests.test_objectives_data:nothing")
    with pytest.raises(DataError):
        E.select_top_experts([str(tmp_path / "missing.parquet")], redness, 3, tmp_path / "e2", progress=False)


def test_data_cli_verbs(tmp_path):
    from diffusion_po.cli import main

    src = write_pickapic(tmp_path / "pp.parquet", n=4, drop_columns=["caption_0", "caption_1"])
    assert main(["data", "experts", str(src), "--top", "2", "--scorer", "tests.test_objectives_data:redness",
                 "-o", str(tmp_path / "ex")]) == 0
    assert len((tmp_path / "ex" / "experts.jsonl").read_text().splitlines()) == 2
    assert main(["data", "captions", str(src), "-o", str(tmp_path / "c.parquet"), "--strategy", "perturbation"]) == 0
    assert "caption_1" in pq.read_table(tmp_path / "c.parquet").column_names
    assert main(["data", "captions", str(src), "-o", str(tmp_path / "d.parquet"), "--strategy", "hybrid"]) == 2
