"""`diffusion-po sample` end to end on each family's tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_po.cli import main
from diffusion_po.errors import UserError
from diffusion_po.sampling.io import parse_weighted, read_png_metadata, read_prompt_file


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _rows(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_cli_writes_images_metadata_manifest_and_grid(tiny_model_factory, tmp_path, family):
    out = tmp_path / "out"
    argv = [
        "sample", "--model", tiny_model_factory(family), "--prompt", "a red circle and a blue square",
        "--prompt", "a green star", "--negative-prompt", "red:1.5", "--guidance", "perp-neg",
        "--guidance-scale", "6", "-n", "2", "--seed", "10", "--steps", "2", "--batch-size", "3",
        "--output-dir", str(out), "--grid", "--no-progress",
    ]
    assert main(argv) == 0
    rows = _rows(out)
    assert len(rows) == 4
    assert sorted((r["prompt_index"], r["seed"]) for r in rows) == [(0, 10), (0, 11), (1, 12), (1, 13)]  # seed + i*n + k
    for r in rows:
        png = out / r["file"]
        assert png.is_file()
        meta = read_png_metadata(png)
        assert meta["prompt"] == r["prompt"] and meta["seed"] == r["seed"]
        assert meta["guidance"] == "perp-neg" and meta["guidance_scale"] == 6.0 and meta["steps"] == 2
        assert meta["negatives"] == [["red", 1.5]] and meta["family"] == family
        with Image.open(png) as im:
            assert im.size == (32, 32)
            assert im.text["prompt"] == r["prompt"] and im.text["seed"] == str(r["seed"])
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * 32, 2 * 32)  # rows = prompts, columns = seeds
    # deterministic: same command, same pixels
    out2 = tmp_path / "out2"
    assert main(argv[:-4] + ["--output-dir", str(out2), "--no-progress", "--batch-size", "1"]) == 0
    for r in rows:
        a = np.asarray(Image.open(out / r["file"]), dtype=np.int16)
        b = np.asarray(Image.open(out2 / r["file"]), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # batch composition may move a value by one rounding step


def test_cli_prompt_files_and_schedulers(tiny_model_factory, tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "a cat", "negative_prompt": [["dog", 2.0], "cow"], "seeds": [3]}) + "\n\n"
        + json.dumps({"prompt": "a dog", "id": "x7"}) + "\n"
    )
    out = tmp_path / "o"
    assert main(["sample", "--model", tiny_model_factory("sd"), "--prompts", str(jsonl), "--guidance", "composable",
                 "--scheduler", "euler_a", "--steps", "2", "--seeds", "0-1", "-o", str(out), "--no-progress"]) == 0
    rows = _rows(out)
    assert len(rows) == 3  # the first row's own seed list overrides --seeds
    by_prompt = {(r["prompt"], r["seed"]): r for r in rows}
    assert by_prompt[("a cat", 3)]["negatives"] == [["dog", 2.0], ["cow", 1.0]]
    assert by_prompt[("a dog", 1)]["prompt_id"] == "x7"
    assert rows[0]["scheduler"] == "EulerAncestralDiscreteScheduler"
    out_set = tmp_path / "set"
    assert main(["sample", "--model", tiny_model_factory("sd"), "--prompt-set", "parti", "--limit", "2", "--steps", "1",
                 "-o", str(out_set), "--no-progress"]) == 0
    assert [r["prompt_id"] for r in _rows(out_set)] == ["00000", "00001"]
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n a dog \n")
    assert [r["prompt"] for r in read_prompt_file(txt)] == ["a cat", "a dog"]


def test_cli_npo_lora_and_negative_model(tiny_model_factory, tmp_path):
    from diffusion_po.families import load_pipeline
    from tests.test_sampling import _save_lora

    path = tiny_model_factory("sd3")
    pipe = load_pipeline(path)
    npo = _save_lora(pipe, tmp_path / "npo", seed=7)
    out = tmp_path / "o"
    assert main(["sample", "--model", path, "--npo-lora", str(npo), "--guidance", "npo", "--prompt", "a cat",
                 "--steps", "2", "-o", str(out), "--no-progress"]) == 0
    row = _rows(out)[0]
    assert row["negative_model"]["form"] == "adapter" and row["negative_model"]["npo_lora"] == str(npo)
    # a separate negative network equal to the positive one reproduces plain CFG
    out_neg, out_cfg = tmp_path / "n", tmp_path / "c"
    common = ["--prompt", "a cat", "--steps", "2", "--no-progress", "--guidance-scale", "5"]
    assert main(["sample", "--model", path, "--negative-model", path, "--guidance", "npo", "-o", str(out_neg)] + common) == 0
    assert main(["sample", "--model", path, "-o", str(out_cfg)] + common) == 0
    a = np.asarray(Image.open(out_neg / _rows(out_neg)[0]["file"]), dtype=np.int16)
    b = np.asarray(Image.open(out_cfg / _rows(out_cfg)[0]["file"]), dtype=np.int16)
    assert np.abs(a - b).max() <= 1
    c = np.asarray(Image.open(out / row["file"]), dtype=np.int16)
    assert np.abs(c - b).max() > 1  # the NPO LoRA changes the image


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "no prompts"),
        (["--prompt", "a", "--negative-prompt", "x", "--negative-prompt", "y"], "one negative prompt"),
        (["--prompt", "a", "--guidance", "npo"], "needs NPO weights"),
        (["--prompt", "a", "--scheduler", "nonsense"], "unknown scheduler"),
        (["--prompt", "a", "--guidance", "perp-neg", "--negative-prompt", "x:-1.5"], "must be >= 0"),
        (["--prompts", "/nonexistent.txt"], "does not exist"),
        (["--prompt", "a", "--npo-lora", "/nonexistent/npo"], "does not exist"),
        (["--prompt", "a", "--guidance", "perp-neg", "--negative-prompt", "x:nan"], "finite number"),
        (["--prompt", "a", "--guidance", "perp-neg", "--negative-prompt", "x:inf"], "finite number"),
        (["--prompt", "a", "--guidance-rescale", "1.5"], "must lie in [0, 1]"),
        (["--prompt", "a", "--guidance-rescale", "-0.1"], "must lie in [0, 1]"),
        (["--prompt", "a", "--guidance-rescale", "nan"], "must lie in [0, 1]"),
        (["--prompt", "a", "--scheduler", "flow_euler"], "does not fit StableDiffusionPipeline"),
        (["--prompt", "a", "--lora", "someorg/some-lora"], "hub id: this machine may be offline"),
        (["--prompt", "a", "--npo-lora", "someorg/some-lora"], "hub id: this machine may be offline"),
        (["--prompt-set", "parti", "--limit", "0"], "--limit 0"),
    ],
)
def test_cli_errors_are_one_line(tiny_model_factory, tmp_path, capsys, extra, message):
    code = main(["sample", "--model", tiny_model_factory("sd"), "--steps", "1", "-o", str(tmp_path), "--no-progress"] + extra)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_cli_samples_a_shipped_prompt_set(tiny_model_factory, tmp_path):
    """`--prompt-set parti --limit 2`: the first two PartiPrompts (prompt rows built by eval.prompts)."""
    from diffusion_po.eval.prompts import load_parti

    out = tmp_path / "parti"
    assert main(["sample", "--model", tiny_model_factory("sd"), "--prompt-set", "parti", "--limit", "2",
                 "--steps", "1", "-o", str(out), "--no-progress"]) == 0
    assert [r["prompt"] for r in _rows(out)] == load_parti().prompts[:2]


def test_parse_weighted():
    assert parse_weighted("red:1.5") == ("red", 1.5)
    assert parse_weighted("red") == ("red", 1.0)
    assert parse_weighted("style: watercolor") == ("style: watercolor", 1.0)
    assert parse_weighted("a:b:0.5") == ("a:b", 0.5)
    # only a trailing :NUMBER after a non-digit is a weight; \: is a literal colon
    assert parse_weighted("aspect ratio 16:9") == ("aspect ratio 16:9", 1.0)
    assert parse_weighted("at 12:30") == ("at 12:30", 1.0)
    assert parse_weighted("aspect ratio 16:9 :0.5") == ("aspect ratio 16:9", 0.5)
    assert parse_weighted("mood\\:2") == ("mood:2", 1.0)
    assert parse_weighted("red: 2e-1") == ("red", 0.2)
    for bad in ("red:nan", "red:inf", "red:-inf", "red: NaN"):
        with pytest.raises(UserError, match="finite"):
            parse_weighted(bad)


def test_weighted_prompts_same_rule_in_the_python_api(tmp_path):
    """`weighted()` (the API's negative_prompt=...) and prompt files read "red:1.5" as the CLI does."""
    from diffusion_po.sampling.sampler import weighted

    assert weighted("red:1.5") == [("red", 1.5)] == weighted(["red:1.5"])
    assert weighted(["aspect ratio 16:9", ("blue", 2)]) == [("aspect ratio 16:9", 1.0), ("blue", 2.0)]
    with pytest.raises(UserError, match="finite"):
        weighted([("red", float("nan"))])
    with pytest.raises(UserError, match="finite"):
        weighted(["red:inf"])
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a", "negative_prompt": [["x", "inf"]]}) + "\n")
    with pytest.raises(UserError, match="finite"):
        read_prompt_file(tmp_path / "p.jsonl")
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "a", "negative_prompt": "red:1.5"}) + "\n")
    assert read_prompt_file(tmp_path / "q.jsonl")[0]["negatives"] == [("red", 1.5)]


def test_perp_neg_weight_reaches_the_sampler_from_the_api(tiny_model_factory):
    """generate(negative_prompt="red:1.5") == generate(negative_prompt=[("red", 1.5)]) != weight 1."""
    from diffusion_po.families import load_pipeline
    from diffusion_po.sampling import generate

    pipe = load_pipeline(tiny_model_factory("sd"))
    kw = {"guidance": "perp-neg", "scale": 5.0, "steps": 2, "output_type": "latent", "seeds": [1]}
    text = generate(pipe, ["a cat"], negative_prompt="red:1.5", **kw)[0]
    pair = generate(pipe, ["a cat"], negative_prompt=[("red", 1.5)], **kw)[0]
    one = generate(pipe, ["a cat"], negative_prompt=[("red", 1.0)], **kw)[0]
    torch.testing.assert_close(text, pair)
    assert (text - one).abs().max() > 1e-4


def test_cli_refuses_empty_seed_ranges_and_zero_steps(tiny_model_factory, tmp_path, capsys):
    base = ["sample", "--model", tiny_model_factory("sd"), "--prompt", "a", "-o", str(tmp_path), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(base + ["--seeds", "3-1,7"])
    assert exc.value.code == 2 and "seed range '3-1' is empty" in capsys.readouterr().err
    assert main(base + ["--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err


def test_cli_scheduler_errors(tiny_model_factory, tmp_path, capsys, monkeypatch):
    """A DDPM-type scheduler on a flow model, and a scheduler whose dependency is missing (diffusers then
    exports a placeholder class that raises on use, as it does without scipy for lms)."""
    import diffusers
    from diffusers.utils import dummy_torch_and_scipy_objects

    base = ["--prompt", "a", "--steps", "1", "-o", str(tmp_path), "--no-progress"]
    assert main(["sample", "--model", tiny_model_factory("sd3"), "--scheduler", "ddim"] + base) == 2
    err = capsys.readouterr().err
    assert "does not fit StableDiffusion3Pipeline, a flow-matching model" in err and "flow_euler" in err
    monkeypatch.setattr(diffusers, "LMSDiscreteScheduler", dummy_torch_and_scipy_objects.LMSDiscreteScheduler)
    assert main(["sample", "--model", tiny_model_factory("sd"), "--scheduler", "lms"] + base) == 2
    err = capsys.readouterr().err
    assert "scheduler 'lms' (LMSDiscreteScheduler)" in err and "scipy" in err and "Traceback" not in err


@pytest.mark.slow  # inductor compiles the blocks on the CPU (about a minute)
def test_cli_compile_matches_eager(tiny_model_factory, tmp_path):
    """`--compile` compiles the network's repeated blocks and draws the same images as eager sampling."""
    model = tiny_model_factory("sd")
    common = ["sample", "--model", model, "--prompt", "a cat", "--steps", "2", "--seeds", "0-1", "--no-progress"]
    assert main([*common, "-o", str(tmp_path / "eager")]) == 0
    assert main([*common, "--compile", "-o", str(tmp_path / "compiled")]) == 0
    eager, compiled = _rows(tmp_path / "eager"), _rows(tmp_path / "compiled")
    assert [r["compile"] for r in eager + compiled] == [False, False, True, True]
    for a, b in zip(eager, compiled):
        pa = np.asarray(Image.open(tmp_path / "eager" / a["file"]), dtype=np.int16)
        pb = np.asarray(Image.open(tmp_path / "compiled" / b["file"]), dtype=np.int16)
        assert np.abs(pa - pb).max() <= 2  # compiled kernels may round differently, not more


def test_full_fine_tune_output_samples_with_network(tiny_model_factory, tmp_path, capsys):
    """A full fine-tune's output_dir (unet/ only): `--model` on it says what to do; `--network` samples it."""
    from accelerate.state import AcceleratorState

    from diffusion_po.config import TrainConfig, from_dict
    from diffusion_po.families import load_pipeline
    from diffusion_po.training.trainer import Trainer

    base = tiny_model_factory("sd")
    AcceleratorState._reset_state()
    trainer = Trainer(from_dict(TrainConfig, {
        "pretrained_model_name_or_path": base, "output_dir": str(tmp_path / "run"), "resolution": 32,
        "use_lora": False, "report_to": "none", "data": {"format": "pickapic"},
    }))
    with torch.no_grad():
        for p in trainer.unwrapped.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
    trainer.save_final()
    AcceleratorState._reset_state()
    assert (tmp_path / "run" / "unet" / "config.json").is_file()

    common = ["--prompt", "a cat", "--steps", "2", "--no-progress"]
    assert main(["sample", "--model", str(tmp_path / "run"), "-o", str(tmp_path / "x")] + common) == 2
    err = capsys.readouterr().err
    assert "--network" in err and "save_full_pipeline" in err and "Traceback" not in err

    assert main(["sample", "--model", base, "--network", str(tmp_path / "run"), "-o", str(tmp_path / "net")] + common) == 0
    pipe = load_pipeline(base)  # the same network saved as a whole pipeline
    pipe.register_modules(unet=trainer.unwrapped)
    pipe.save_pretrained(tmp_path / "full")
    assert main(["sample", "--model", str(tmp_path / "full"), "-o", str(tmp_path / "ref")] + common) == 0
    assert main(["sample", "--model", base, "-o", str(tmp_path / "base")] + common) == 0
    img = {k: np.asarray(Image.open(tmp_path / k / _rows(tmp_path / k)[0]["file"]), dtype=np.int16)
           for k in ("net", "ref", "base")}
    assert np.array_equal(img["net"], img["ref"]) and np.abs(img["net"] - img["base"]).max() > 1
    assert _rows(tmp_path / "net")[0]["network"] == str(tmp_path / "run")


def test_readme_sample_command_with_a_trained_lora(tiny_model_factory, tmp_path):
    """README's Sample command shape: --lora (a LoRA as the trainer saves it) with Perp-Neg and "red:1.5"."""
    from tests.test_eval_pipeline import _tiny_lora

    model = tiny_model_factory("sd")
    lora = _tiny_lora(model, tmp_path / "sd15_dpo_lora")
    common = ["--prompt", "a red circle and a blue square", "--negative-prompt", "red:1.5", "--guidance", "perp-neg",
              "--guidance-scale", "7.5", "--seeds", "0-1", "--steps", "2", "--no-progress"]
    assert main(["sample", "--model", model, "--lora", str(lora), *common, "--output-dir", str(tmp_path / "s"),
                 "--grid"]) == 0
    assert main(["sample", "--model", model, *common, "--output-dir", str(tmp_path / "b")]) == 0
    rows = _rows(tmp_path / "s")
    assert [r["seed"] for r in rows] == [0, 1] and rows[0]["negatives"] == [["red", 1.5]]
    assert (tmp_path / "s" / "grid.png").is_file()
    a = np.asarray(Image.open(tmp_path / "s" / rows[0]["file"]), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "b" / _rows(tmp_path / "b")[0]["file"]), dtype=np.int16)
    assert np.abs(a - b).max() > 1  # the LoRA is applied
