"""Scorers on tiny random-initialised models of the real classes: formulas against direct computations,
the transformers-5 return type, strict loading, offline behaviour, hashes and prefetch plans."""

from __future__ import annotations

import hashlib
import math
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_po.errors import ModelLoadError, UserError
from diffusion_po.eval.models import checkpoint_hash, prefetch
from diffusion_po.eval.scorers import build_scorer, parse_checkpoint_options, parse_metric_list
from diffusion_po.eval.scorers.base import as_embedding
from diffusion_po.eval.testing import build_tiny_models_root, save_tiny_hps, tiny_checkpoint_options

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp() / "eval_tiny_models"
    if not (base / "aesthetic").is_dir():
        build_tiny_models_root(base)
    return base


@pytest.fixture(scope="module")
def opts(models_root):
    return parse_checkpoint_options(tiny_checkpoint_options(models_root))


def _images(n: int = 3, seed: int = 0, size=(32, 32)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a red cube on a table", "a photo of a cat", "an oil painting of a lighthouse in a storm"]


# --------------------------------------------------------------------------------------------- PickScore
def _direct_clip_cosines(folder: Path, images, prompts):
    """Cosine computed by hand from the CLIP parts (vision/text towers + projections)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    proc = CLIPImageProcessorPil.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        px = proc(images=images, return_tensors="pt")["pixel_values"]
        img = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        t = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = model.text_projection(model.text_model(input_ids=t.input_ids, attention_mask=t.attention_mask).pooler_output)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1), model.logit_scale.exp().item()


def test_pickscore_formula_matches_direct_computation(models_root):
    scorer = build_scorer("pickscore", models_root=models_root)
    images = _images()
    out = scorer.score_all(images, PROMPTS)
    cos, scale = _direct_clip_cosines(models_root / "PickScore_v1", images, PROMPTS)
    assert not math.isclose(scale, 100.0)  # the tiny model has logit_scale = 3 -> e^3; read, not hard-coded
    np.testing.assert_allclose(out["pickscore_cos"], cos.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["pickscore"], scale * cos.numpy(), rtol=1e-4, atol=1e-4)
    assert scorer.score(images, PROMPTS) == out["pickscore"]
    info = scorer.info()
    assert info["checkpoint_hash"].startswith("sha256:") and "pickscore" in info["version"]


def test_pickscore_uses_pil_bicubic_preprocessing(models_root):
    """Non-square image: shortest edge to 32 with PIL bicubic, centre crop, OpenAI mean/std."""
    scorer = build_scorer("pickscore", models_root=models_root)
    (img,) = _images(1, seed=3, size=(48, 40))
    got = scorer.image_transform()(img)
    resized = img.resize((int(32 * 48 / 40), 32), Image.BICUBIC)
    left = (resized.width - 32) // 2
    arr = np.asarray(resized.crop((left, 0, left + 32, 32)), dtype=np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    expected = ((arr - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_transformers5_output_objects_and_tensor_returns_agree(models_root, monkeypatch):
    import transformers

    scorer = build_scorer("pickscore", models_root=models_root)
    images = _images(2)
    px = torch.stack([scorer.image_transform()(im) for im in images])
    raw = scorer.model.get_image_features(pixel_values=px)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert not isinstance(raw, torch.Tensor) and isinstance(raw.pooler_output, torch.Tensor)
    expected = scorer.score_all(images, PROMPTS[:2])

    # transformers 4.x behaviour: plain tensors
    model = scorer.model
    orig_img, orig_txt = model.get_image_features, model.get_text_features
    monkeypatch.setattr(model, "get_image_features", lambda **kw: as_embedding(orig_img(**kw)))
    monkeypatch.setattr(model, "get_text_features", lambda **kw: as_embedding(orig_txt(**kw)))
    scorer._text_cache.clear()
    np.testing.assert_allclose(scorer.score_all(images, PROMPTS[:2])["pickscore"], expected["pickscore"], rtol=1e-6)
    with pytest.raises(TypeError):
        as_embedding(object())


def test_text_cache_is_batch_composition_invariant(models_root):
    scorer = build_scorer("pickscore", models_root=models_root)
    images = _images(3)
    together = scorer.score_all(images, PROMPTS)["pickscore"]
    fresh = build_scorer("pickscore", models_root=models_root)
    one_by_one = [fresh.score_all([im], [p])["pickscore"][0] for im, p in zip(images, PROMPTS)]
    np.testing.assert_allclose(together, one_by_one, rtol=1e-4, atol=1e-4)
    assert set(scorer._text_cache) == set(PROMPTS)


def test_clip_strict_loading_errors(models_root, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "PickScore_missing"
    shutil.copytree(models_root / "PickScore_v1", bad)
    state = load_file(bad / "model.safetensors")
    state.pop("visual_projection.weight")
    save_file(state, bad / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing"):
        build_scorer("pickscore", checkpoint=str(bad))

    wrong = tmp_path / "PickScore_shape"
    shutil.copytree(models_root / "PickScore_v1", wrong)
    cfg = (wrong / "config.json").read_text().replace('"projection_dim": 16', '"projection_dim": 24')
    (wrong / "config.json").write_text(cfg)
    with pytest.raises(ModelLoadError, match="PickScore_shape"):
        build_scorer("pickscore", checkpoint=str(wrong))

    other = tmp_path / "not_clip"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelLoadError, match="expected a CLIPModel"):
        build_scorer("pickscore", checkpoint=str(other))
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_scorer("pickscore", checkpoint=str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------- HPS
def _direct_hps(arch_json: Path, ckpt: Path, pixels: torch.Tensor, prompts):
    import open_clip

    open_clip.add_model_config(arch_json)
    model = open_clip.create_model(arch_json.stem, pretrained=None).eval()
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    model.load_state_dict({k: v.float() for k, v in state.items()})
    tok = open_clip.get_tokenizer(arch_json.stem)
    with torch.no_grad():
        i = model.encode_image(pixels)
        t = model.encode_text(tok(prompts))
    i = i / i.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    return 100 * (i * t).sum(-1)


def test_hps_formula_and_fp16_checkpoint(models_root, opts):
    scorer = build_scorer("hps_v2.1", models_root=models_root, **opts["hps_v2.1"])
    assert scorer.metrics == ("hps_v2.1",)
    images = _images()
    pixels = torch.stack([scorer.image_transform()(im) for im in images])
    expected = _direct_hps(models_root / "HPSv2" / "tiny-hps.json", models_root / "HPSv2" / "HPS_v2.1_compressed.pt",
                           pixels, PROMPTS)
    got = scorer.score_all(images, PROMPTS)["hps_v2.1"]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-3)
    # weights are the fp16 values of the file, held in fp32
    param = next(scorer.model.parameters())
    assert param.dtype == torch.float32
    v2 = build_scorer("hps_v2", models_root=models_root, **opts["hps_v2"])
    assert v2.metrics == ("hps_v2",) and v2.checkpoint_hash != scorer.checkpoint_hash


def test_hps_resize_max_size_transform():
    """Longest side to 32 (tensor bicubic, antialias), symmetric zero padding, then normalisation."""
    import torchvision.transforms.functional as TF

    from diffusion_po.eval.scorers.openclip import OPENAI_MEAN, OPENAI_STD, ResizeMaxSizeTransform

    (img,) = _images(1, seed=5, size=(64, 40))  # width 64, height 40 -> 32 x 20, pad 6 top / 6 bottom
    out = ResizeMaxSizeTransform(32)(img)
    assert out.shape == (3, 32, 32)
    x = TF.to_tensor(img)
    resized = TF.resize(x, [20, 32], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    expected = TF.normalize(TF.pad(resized, [0, 6, 0, 6], fill=0), OPENAI_MEAN, OPENAI_STD)
    torch.testing.assert_close(out, expected)
    pad_value = -torch.tensor(OPENAI_MEAN) / torch.tensor(OPENAI_STD)
    torch.testing.assert_close(out[:, 0, 0], pad_value)
    # square images of the right size pass through untouched apart from normalisation
    (sq,) = _images(1, seed=6)
    torch.testing.assert_close(ResizeMaxSizeTransform(32)(sq), TF.normalize(TF.to_tensor(sq), OPENAI_MEAN, OPENAI_STD))


def test_hps_strict_loading_errors(models_root, opts, tmp_path):
    arch = opts["hps_v2.1"]["arch"]
    state = torch.load(models_root / "HPSv2" / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]

    missing = dict(state)
    missing.pop("text_projection")
    torch.save({"state_dict": missing}, tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match="1 missing"):
        build_scorer("hps_v2.1", checkpoint=str(tmp_path / "missing.pt"), arch=arch)

    extra = dict(state, **{"module_extra.weight": torch.zeros(1)})
    torch.save({"state_dict": extra}, tmp_path / "extra.pt")
    with pytest.raises(ModelLoadError, match="unexpected"):
        build_scorer("hps_v2.1", checkpoint=str(tmp_path / "extra.pt"), arch=arch)

    # a checkpoint of another architecture (embed_dim 24): wrong shapes
    import json

    other_cfg = json.loads(Path(arch).read_text())
    other_cfg["embed_dim"] = 24
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "tiny-hps-24.json").write_text(json.dumps(other_cfg))
    _, other_ckpt = save_tiny_hps(other_dir, "other.pt")
    import open_clip

    open_clip.add_model_config(other_dir / "tiny-hps-24.json")
    m = open_clip.create_model("tiny-hps-24", pretrained=None)
    torch.save({"state_dict": m.state_dict()}, other_ckpt)
    with pytest.raises(ModelLoadError, match="wrong shapes"):
        build_scorer("hps_v2.1", checkpoint=str(other_ckpt), arch=arch)

    # HPS_v2.pt-style file with non-tensor objects: refused by weights_only
    import argparse

    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "full.pt")
    with pytest.raises(ModelLoadError, match="weights-only"):
        build_scorer("hps_v2.1", checkpoint=str(tmp_path / "full.pt"), arch=arch)

    with pytest.raises(ModelLoadError, match="does not exist"):
        build_scorer("hps_v2.1", checkpoint=str(tmp_path / "absent.pt"), arch=arch)
    with pytest.raises(ModelLoadError, match="unknown open_clip architecture"):
        build_scorer("hps_v2.1", models_root=models_root, arch="No-Such-Arch")


# --------------------------------------------------------------------------------------------- CLIP + aesthetic
def test_clip_score_convention_and_metric_names(models_root):
    scorer = build_scorer("clip", models_root=models_root)
    assert scorer.metrics == ("clip_score@clip-vit-large-patch14", "clip_cos@clip-vit-large-patch14")
    images = _images()
    out = scorer.score_all(images, PROMPTS)
    cos, _ = _direct_clip_cosines(models_root / "clip-vit-large-patch14", images, PROMPTS)
    np.testing.assert_allclose(out[scorer.metrics[1]], cos.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[scorer.metrics[0]], np.maximum(100 * cos.numpy(), 0), rtol=1e-4, atol=1e-3)
    named = build_scorer("clip", checkpoint=str(models_root / "PickScore_v1"))
    assert named.metrics[0] == "clip_score@pickscore_v1"


def test_aesthetic_formula(models_root):
    scorer = build_scorer("aesthetic", models_root=models_root)
    images = _images()
    got = scorer.score_all(images, PROMPTS)["aesthetic_v2"]
    cos_model_dir = models_root / "clip-vit-large-patch14"
    from transformers import CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(cos_model_dir).eval()
    px = CLIPImageProcessorPil.from_pretrained(cos_model_dir)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
    x = (emb / emb.norm(dim=-1, keepdim=True)).numpy().astype(np.float64)
    state = torch.load(models_root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    for i in (0, 2, 4, 6, 7):  # Linear layers only: dropouts are identity at eval, no activations
        x = x @ state[f"layers.{i}.weight"].double().numpy().T + state[f"layers.{i}.bias"].double().numpy()
    np.testing.assert_allclose(got, x[:, 0], rtol=1e-4, atol=1e-4)


def test_aesthetic_head_errors(models_root, tmp_path):
    from diffusion_po.eval.testing import save_tiny_aesthetic

    wrong_dim = save_tiny_aesthetic(tmp_path / "head768.pth", input_size=768)
    with pytest.raises(ModelLoadError, match="768-d"):
        build_scorer("aesthetic", checkpoint=str(wrong_dim), backbone=str(models_root / "clip-vit-large-patch14"))
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "junk.pth")
    with pytest.raises(ModelLoadError, match="not an improved-aesthetic-predictor head"):
        build_scorer("aesthetic", checkpoint=str(tmp_path / "junk.pth"), models_root=models_root)


def test_imagereward_is_optional():
    try:
        import ImageReward  # noqa: F401
    except Exception:
        with pytest.raises(ModelLoadError, match="optional 'image-reward' package"):
            build_scorer("imagereward")
    else:  # pragma: no cover - only where the extra is installed
        pytest.skip("image-reward installed")


# --------------------------------------------------------------------------------------------- offline
@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def refuse(self, address, *a, **k):
        calls.append(address)
        raise OSError(f"network disabled in test (connect to {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return calls


def test_offline_hub_id_fails_fast_without_network(no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("DIFFUSION_PO_MODELS_ROOT", raising=False)
    for name in ("pickscore", "hps_v2.1", "clip"):
        with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE|offline"):
            build_scorer(name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        build_scorer("aesthetic")
    assert no_network == []


def test_models_root_loads_everything_without_network(no_network, models_root, opts, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("DIFFUSION_PO_MODELS_ROOT", str(models_root))  # the env var works like --models-root
    for name in ("pickscore", "hps_v2.1", "clip", "aesthetic"):
        scorer = build_scorer(name, **opts.get(name, {}))
        assert len(scorer.score(_images(1), PROMPTS[:1])) == 1
    assert no_network == []


def test_models_root_missing_files_and_hub_ids_are_errors(tmp_path, no_network):
    with pytest.raises(ModelLoadError, match="prefetch"):
        build_scorer("pickscore", models_root=tmp_path)
    with pytest.raises(ModelLoadError, match="forbids network"):
        build_scorer("pickscore", models_root=tmp_path, checkpoint="yuvalkirstain/PickScore_v1")
    with pytest.raises(ModelLoadError, match="HPS_v2.1_compressed.pt"):
        build_scorer("hps_v2.1", models_root=tmp_path)
    assert no_network == []


def test_prefetch_dry_run_lists_exactly_the_needed_files(tmp_path):
    plan = prefetch(tmp_path, parse_metric_list("pickscore,hps_v2.1,aesthetic"), dry_run=True)
    targets = {str(t.relative_to(tmp_path)) for _, t in plan}
    assert "PickScore_v1/model.safetensors" in targets
    assert "HPSv2/HPS_v2.1_compressed.pt" in targets and "HPSv2/HPS_v2_compressed.pt" not in targets
    assert "aesthetic/sac+logos+ava1-l14-linearMSE.pth" in targets
    assert "clip-vit-large-patch14/model.safetensors" in targets
    assert not any(t.endswith(("pytorch_model.bin", "HPS_v2.pt", "open_clip_pytorch_model.bin")) for t in targets)
    assert len(targets) == len(plan)
    sources = dict((str(t.relative_to(tmp_path)), s) for s, t in plan)
    assert sources["HPSv2/HPS_v2.1_compressed.pt"] == "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"
    assert not any(tmp_path.iterdir())  # nothing downloaded or created


def test_checkpoint_hash_is_sha256_of_the_weights(models_root):
    f = models_root / "HPSv2" / "HPS_v2.1_compressed.pt"
    assert checkpoint_hash(f) == "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest()
    folder = models_root / "PickScore_v1"
    assert checkpoint_hash(folder) == "sha256:" + hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_option_parsing():
    opts = parse_checkpoint_options(["hps_v2.1.arch=/a.json", "hps_v2.1=/m/x.pt", "pickscore=/m/p", "hps=/m/y.pt"])
    assert opts["hps_v2.1"] == {"arch": "/a.json", "checkpoint": "/m/y.pt"}
    assert opts["pickscore"] == {"checkpoint": "/m/p"}
    assert parse_metric_list("PickScore, hps, hps_v2,aesthetic_v2") == ["pickscore", "hps_v2.1", "hps_v2", "aesthetic"]
    with pytest.raises(UserError, match="unknown metric"):
        parse_metric_list("fid")
    with pytest.raises(UserError, match="no option"):
        parse_checkpoint_options(["pickscore.arch=x"])
    with pytest.raises(UserError):
        parse_checkpoint_options(["pickscore"])


def test_fast_clip_transform_equals_the_processor():
    """The direct PIL path of HFImageTransform gives the processor's tensors for any size and mode."""
    from transformers import CLIPImageProcessorPil

    from diffusion_po.eval.scorers.hf_clip import HFImageTransform

    rng = np.random.default_rng(0)
    for shortest, crop in ((32, 32), (30, 24)):
        proc = CLIPImageProcessorPil(size={"shortest_edge": shortest}, crop_size={"height": crop, "width": crop})
        transform = HFImageTransform(proc)
        assert transform.fast
        for w, h in ((64, 64), (48, 40), (40, 48), (33, 97), (96, 64), (32, 32), (7, 9)):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            expected = proc(images=img, return_tensors="pt")["pixel_values"][0]
            torch.testing.assert_close(transform(img), expected, atol=1e-5, rtol=0)
        rgba = Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
        torch.testing.assert_close(transform(rgba), proc(images=rgba, return_tensors="pt")["pixel_values"][0])
    odd = CLIPImageProcessorPil(size={"height": 32, "width": 32})
    assert not HFImageTransform(odd).fast


# ----------------------------------------------------------------------- folders that would load garbage
def test_clip_folder_without_tokenizer_files_is_an_error(models_root, tmp_path):
    """Without vocab.json/merges.txt/tokenizer.json transformers builds an empty tokenizer (every prompt
    scores the same): refused, naming the files."""
    for name in ("pickscore", "clip"):
        folder = tmp_path / name
        shutil.copytree(models_root / ("PickScore_v1" if name == "pickscore" else "clip-vit-large-patch14"), folder)
        for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / f).unlink(missing_ok=True)
        with pytest.raises(ModelLoadError, match="no tokenizer: expected tokenizer.json, or vocab.json and merges.txt"):
            build_scorer(name, checkpoint=str(folder))


def _open_clip_hub_folder(folder: Path, with_weights: bool) -> Path:
    import json

    import open_clip
    from safetensors.torch import save_file

    from diffusion_po.eval.testing import TINY_OPEN_CLIP_CONFIG

    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CONFIG, "preprocess_cfg": {}}))
    if with_weights:
        torch.manual_seed(0)
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_clip_openclip_with_only_its_config_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="has no weights \\(open_clip_model.safetensors"):
        build_scorer("clip_openclip", checkpoint=str(_open_clip_hub_folder(tmp_path / "cfg_only", False)))
    scorer = build_scorer("clip_openclip", checkpoint=str(_open_clip_hub_folder(tmp_path / "full", True)))
    assert len(scorer.score(_images(2), PROMPTS[:2])) == 2


def test_truncated_checkpoint_is_caught_before_a_non_strict_load(tmp_path):
    """What ImageRewardScorer checks after the package's `load_state_dict(strict=False)`."""
    from diffusion_po.eval.scorers.base import check_checkpoint_covers
    from diffusion_po.eval.scorers.hf_clip import build_aesthetic_mlp

    model = build_aesthetic_mlp(16)
    state = model.state_dict()
    check_checkpoint_covers(model, state, "imagereward", tmp_path / "ImageReward.pt")
    truncated = dict(list(state.items())[:4])
    with pytest.raises(ModelLoadError, match=r"ImageReward.pt lacks 6 of the model's 10 weights"):
        check_checkpoint_covers(model, truncated, "imagereward", tmp_path / "ImageReward.pt")


def test_transparent_images_are_composited_on_white_for_every_scorer(models_root, opts, tmp_path):
    """One rule (composite on white) for in-memory scoring, `eval score` on files and `eval parity`."""
    import json

    from diffusion_po.eval.parity import run_parity
    from diffusion_po.eval.scoring import load_score_table, score_run

    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[:16, :, 3] = 0  # top half fully transparent (black or random colour underneath)
    rgba[16:, :8, 3] = 128
    transparent = Image.fromarray(rgba, "RGBA")
    on_white = Image.alpha_composite(Image.new("RGBA", (32, 32), (255, 255, 255, 255)), transparent).convert("RGB")
    transparent.save(tmp_path / "t.png")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"image": "t.png", "prompt": PROMPTS[0]}) + "\n")
    names = ["pickscore", "clip", "hps_v2.1", "aesthetic"]
    scorers = [build_scorer(n, models_root=str(models_root), **opts.get(n, {})) for n in names]
    for scorer in scorers:
        expected = scorer.score_all([on_white], PROMPTS[:1])
        assert scorer.score_all([transparent], PROMPTS[:1]) == expected, scorer.name
        parity = run_parity([str(tmp_path / "t.png")], PROMPTS[:1], [scorer])
        assert parity["scores"] == expected, scorer.name
    score_run(tmp_path, scorers, batch_size=1, num_workers=0, progress=False)
    rows, _ = load_score_table(tmp_path)
    for scorer in scorers:
        for metric, values in scorer.score_all([on_white], PROMPTS[:1]).items():
            assert rows[0][metric] == pytest.approx(values[0], abs=1e-6), metric
