"""Validation images during training, the trackers, the model card and push_to_hub, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusion_po.cli import main
from diffusion_po.config import load_train_config
from diffusion_po.errors import ConfigError, UserError
from tests.helpers import write_pickapic

PROMPTS = ["a small red circle on the left", "a large blue square at the top"]  # toy captions: the oracle scores them


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory) -> Path:
    return write_pickapic(tmp_path_factory.mktemp("data") / "train.parquet", n=12)


def write_config(tmp_path: Path, model: str, data_file: Path, name: str = "cfg", **overrides) -> Path:
    cfg = {
        "pretrained_model_name_or_path": model, "output_dir": str(tmp_path / name), "resolution": 32,
        "train_batch_size": 2, "max_train_steps": 2, "learning_rate": 1e-2, "checkpointing_steps": 1000,
        "report_to": "none", "use_lora": True, "rank": 4, "beta_dpo": 50.0, "seed": 1,
        "data": {"format": "pickapic", "data_files": [str(data_file)]},
    }
    cfg.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


VALIDATION = {"validation_prompts": PROMPTS, "validation_steps": 1, "num_validation_images": 2,
              "validation_seed": 5, "validation_guidance": {"name": "cfg", "steps": 2}}


def grid_array(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def stock_grid(model: str, lora: str | None = None, **guidance) -> np.ndarray:
    """The validation grid sampled outside training: the same prompts, seeds and settings."""
    from diffusion_po.sampling import PromptSpec, generate, load_sampling_pipeline
    from diffusion_po.sampling.io import make_grid

    pipe, _ = load_sampling_pipeline(model, lora=lora, device="cpu")
    guidance.setdefault("guidance", "cfg")
    negatives = guidance.pop("negatives", [])
    specs = [PromptSpec(p, 5 + j, list(negatives)) for p in PROMPTS for j in range(2)]
    images = generate(pipe, specs, steps=2, height=32, width=32, **guidance)
    return np.asarray(make_grid(images, 2).convert("RGB")).astype(np.int16)


def test_lora_run_writes_grids_scores_trackers_and_card(tmp_path, tiny_sd, pickapic):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path, tiny_sd, pickapic, report_to="tensorboard", tracker_project_name="my-project",
                       logging_dir="tb", validation_scorer="toy", **VALIDATION)
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "cfg"
    grids = out / "validation"
    assert sorted(p.name for p in grids.glob("*.png")) == ["step-0.png", "step-1.png", "step-2.png"]
    # rows: prompts, columns: seeds
    assert Image.open(grids / "step-2.png").size == (2 * 32, 2 * 32)
    # step 0 is the base model's images, the same as sampling the untouched model with the same seeds
    np.testing.assert_array_equal(grid_array(grids / "step-0.png"), stock_grid(tiny_sd))
    # the last grid is the saved LoRA's (fused for sampling outside: float noise only)
    trained = stock_grid(tiny_sd, lora=str(out))
    assert np.abs(grid_array(grids / "step-2.png") - trained).max() <= 2
    assert np.abs(grid_array(grids / "step-0.png") - trained).max() > 2  # the LoRA changed the images

    scores = [json.loads(line) for line in (grids / "scores.jsonl").read_text().splitlines()]
    assert [r["step"] for r in scores] == [0, 1, 2]
    assert all(0.0 <= r["validation/toy"] <= 1.0 for r in scores)

    # tensorboard under logging_dir/tracker_project_name: the images at every round, the score, TRL names
    ea = EventAccumulator(str(out / "tb" / "my-project"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Images("validation")] == [0, 1, 2]
    assert [e.step for e in ea.Scalars("validation/toy")] == [0, 1, 2]
    for name in ("loss", "raw_model_loss", "ref_loss", "implicit_acc", "rewards/chosen", "rewards/rejected",
                 "rewards/accuracies", "rewards/margins"):
        assert [e.step for e in ea.Scalars(name)] == [1, 2], name

    card = (out / "README.md").read_text()
    for text in (tiny_sd, "`dpo`", "beta_dpo | 50", "train.parquet (format pickapic)", "LoRA rank / alpha | 4 / 4",
                 "learning_rate | 0.01", "![base model](validation/step-0.png)", "![trained](validation/step-2.png)",
                 f"| validation/toy | {scores[-1]['validation/toy']:.4g} |", f'pipe.load_lora_weights("{out}")'):
        assert text in card, text
    # the card's loading snippet works as written (on the CPU, in fp32)
    code = card.split("```python\n")[1].split("```")[0]
    code = code.replace("torch.float16", "torch.float32").replace('.to("cuda")', "")
    code = code.replace(f'image = pipe("{PROMPTS[0]}").images[0]', "")
    scope: dict = {}
    exec(code, scope)
    assert scope["pipe"].get_active_adapters()


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full-ema"])
def test_validation_does_not_change_the_trained_weights(tmp_path, tiny_sd, pickapic, lora):
    from safetensors.torch import load_file

    extra = {} if lora else {"use_lora": False, "use_ema": True, "ema_decay": 0.5, "learning_rate": 1e-3}
    plain = write_config(tmp_path, tiny_sd, pickapic, "plain", max_train_steps=3, **extra)
    checked = write_config(tmp_path, tiny_sd, pickapic, "checked", max_train_steps=3, validation_scorer="toy",
                           **{**VALIDATION, "validation_steps": 2}, **extra)
    # the trainer does not seed peft's gaussian LoRA init (it draws from the global generator): same start
    torch.manual_seed(0)
    assert main(["train", str(plain)]) == 0
    torch.manual_seed(0)
    assert main(["train", str(checked)]) == 0
    name = "pytorch_lora_weights.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "plain" / name), load_file(tmp_path / "checked" / name)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("plain", "checked")]
    assert losses[0] == losses[1]
    assert sorted(p.name for p in (tmp_path / "checked" / "validation").glob("*.png")) == [
        "step-0.png", "step-2.png", "step-3.png"]


def test_resume_with_validation_stays_exact_and_keeps_the_grids(tmp_path, tiny_sd, pickapic):
    from safetensors.torch import load_file

    straight = write_config(tmp_path, tiny_sd, pickapic, "straight", max_train_steps=3)
    torch.manual_seed(0)  # the same LoRA init for both runs (peft draws it from the global generator)
    assert main(["train", str(straight)]) == 0
    first = write_config(tmp_path, tiny_sd, pickapic, "resumed", max_train_steps=2, checkpointing_steps=1,
                         validation_scorer="toy", **VALIDATION)
    torch.manual_seed(0)
    assert main(["train", str(first)]) == 0
    out = tmp_path / "resumed"
    base = (out / "validation" / "step-0.png").stat().st_mtime_ns
    # resume from checkpoint-1: steps 2 and 3 are trained again, step 0 is not sampled again
    (out / "checkpoint-2").rename(tmp_path / "moved-away")
    assert main(["train", str(first), "--resume", "--set", "max_train_steps=3", "--set", "validation_steps=3"]) == 0
    assert (out / "validation" / "step-0.png").stat().st_mtime_ns == base
    # the undone step-2 round is gone (validation_steps is now 3), the rounds before the resume stay
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == ["step-0.png", "step-1.png", "step-3.png"]
    steps = [json.loads(line)["step"] for line in (out / "validation" / "scores.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 3]
    a = load_file(tmp_path / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one mixed precision per process unless reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_validation_scorer_with_options_and_bf16(tmp_path, tiny_sd, pickapic, fresh_accelerate_state):
    """A scorer of `eval score` with its options (tiny random PickScore), on a bf16 LoRA run."""
    from diffusion_po.eval.testing import build_tiny_models_root

    root = build_tiny_models_root(tmp_path / "models")
    cfg = write_config(tmp_path, tiny_sd, pickapic, max_train_steps=1, mixed_precision="bf16",
                       validation_scorer="pickscore", validation_scorer_options={"models_root": str(root)},
                       **VALIDATION)
    assert main(["train", str(cfg)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "cfg" / "validation" / "scores.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(np.isfinite(r["validation/pickscore"]) for r in rows)
    card = (tmp_path / "cfg" / "README.md").read_text()
    assert "| validation/pickscore |" in card and "random test weights: pickscore scores mean nothing" in card


@pytest.mark.parametrize("guidance", ["perp-neg", "npo"])
def test_validation_guidance_is_any_of_ours(tmp_path, tiny_sd, pickapic, guidance):
    from diffusion_po.sampling import load_negative_network, load_sampling_pipeline

    settings = {"name": guidance, "steps": 2, "scale": 4.0}
    if guidance == "perp-neg":
        settings["negative_prompt"] = ["red:1.5"]
        expected = stock_grid(tiny_sd, guidance="perp-neg", scale=4.0, negatives=[("red", 1.5)])
    else:
        settings["negative_model"] = tiny_sd  # a pipeline folder as the negative network
        pipe, _ = load_sampling_pipeline(tiny_sd, device="cpu")
        expected = stock_grid(tiny_sd, guidance="npo", scale=4.0, negative_model=load_negative_network(pipe, tiny_sd))
    cfg = write_config(tmp_path, tiny_sd, pickapic, max_train_steps=1,
                       **{**VALIDATION, "validation_guidance": settings})
    assert main(["train", str(cfg)]) == 0
    np.testing.assert_array_equal(grid_array(tmp_path / "cfg" / "validation" / "step-0.png"), expected)


def test_push_to_hub_offline_fails_after_everything_is_saved(tmp_path, tiny_sd, pickapic, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = write_config(tmp_path, tiny_sd, pickapic, max_train_steps=1, push_to_hub=True, hub_model_id="me/tiny-dpo")
    assert main(["train", str(cfg)]) == 2
    captured = capsys.readouterr()
    assert "WARNING: push_to_hub is on but this machine is offline" in captured.out  # said at the start too
    err = captured.err
    assert "push_to_hub: this machine is offline" in err and "hf upload me/tiny-dpo" in err
    out = tmp_path / "cfg"
    for name in ("pytorch_lora_weights.safetensors", "README.md", "config.yaml", "metrics.jsonl", "checkpoint-1"):
        assert (out / name).exists(), name
    assert 'pipe.load_lora_weights("me/tiny-dpo")' in (out / "README.md").read_text()


def test_push_to_hub_without_a_token(tmp_path, monkeypatch):
    import huggingface_hub

    from diffusion_po.training.model_card import push_to_hub

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "0")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError, match=r"no Hugging Face token .* everything is saved in"):
        push_to_hub(tmp_path, None)


def test_model_card_of_a_full_fine_tune_with_eval_numbers(tmp_path):
    from huggingface_hub import ModelCard

    from diffusion_po.training.model_card import card_text, write_model_card

    cfg = load_train_config(None, ["pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5",
                                   "method=npo", "use_lora=false", "data.dataset_name=yuvalkirstain/pickapic_v2"])
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"pickscore": {"mean": 21.25}, "note": "x"}))
    text = card_text(cfg, tmp_path, step=2000, num_processes=8, network_name="unet",
                     network_class="UNet2DConditionModel")
    assert "| pickscore.mean | 21.25 |" in text and "| note |" not in text
    assert "1 per device x 1 accumulation x 8 process(es) = 8" in text
    assert f'UNet2DConditionModel.from_pretrained("{tmp_path}", subfolder="unet"' in text
    assert "diffusion-po sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --negative-model" in text
    card = ModelCard.load(write_model_card(tmp_path, text))
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "diffusion-po-npo" in card.data.tags and card.data.library_name == "diffusers"


def test_validation_config_errors(tmp_path):
    base = ["pretrained_model_name_or_path=x"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    cfg = load_train_config(None, [*base, f"validation_prompts={prompts}", "validation_guidance=perp_neg"])
    assert cfg.validation_guidance.name == "perp-neg"
    from diffusion_po.training.validation import read_prompts

    assert read_prompts(cfg.validation_prompts) == [("a red circle", []), ("a blue square", [])]
    assert read_prompts("a cat") == [("a cat", [])]
    cases = {
        "validation_guidance=nope": "validation_guidance.name",
        "validation_guidance=npo": "needs validation_guidance.negative_model",
        "validation_guidance.negative_model=/m": "read by 'npo' guidance only",
        "validation_scorer=pickscor": "unknown metric 'pickscor'",
        "num_validation_images=0": "num_validation_images",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_train_config(None, [*base, "validation_prompts=[a cat]", override])
    with pytest.raises(ConfigError, match="prompt file .*missing.txt' does not exist"):
        load_train_config(None, [*base, f"validation_prompts={tmp_path / 'missing.txt'}"])


def test_trl_reward_metrics_beside_the_unchanged_dpo_loss():
    import torch.nn.functional as F

    from diffusion_po.objectives import dpo

    g = torch.Generator().manual_seed(0)
    ew, el, rw, rl = (torch.rand(6, generator=g) for _ in range(4))
    beta = 50.0
    total, m = dpo.loss(ew, el, rw, rl, beta=beta)
    z = -0.5 * beta * ((ew - el) - (rw - rl))
    torch.testing.assert_close(total, -F.logsigmoid(z).mean())
    chosen, rejected = -0.5 * beta * (ew - rw), -0.5 * beta * (el - rl)
    torch.testing.assert_close(m["rewards/chosen"], chosen.mean())
    torch.testing.assert_close(m["rewards/rejected"], rejected.mean())
    torch.testing.assert_close(m["rewards/margins"], (chosen - rejected).mean())
    assert float(m["rewards/margins"]) == float(m["reward_margin"])
    assert float(m["rewards/accuracies"]) == float((chosen > rejected).float().mean())
    for name in ("loss", "raw_model_loss", "ref_loss", "implicit_acc"):  # the diffusers DPO example's names
        assert name in m
