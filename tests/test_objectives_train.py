"""One tiny training step of every method of issue 4 through the CLI (`diffusion-po train CONFIG --set ...`),
on a tiny model of each family where the method applies; outputs and logged metrics are checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusion_po.cli import main
from tests.helpers import RGB, write_pickapic

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("objdata")
    out = {"pickapic": write_pickapic(root / "pp.parquet", n=8)}
    rows = []
    for i, (name, rgb) in enumerate(list(RGB.items()) * 2):
        arr = np.clip(np.array(rgb)[None, None] + np.random.default_rng(i).normal(0, 15, (32, 40, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(root / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": f"a {name} square", "label": int(name in ("red", "blue"))})
    (root / "images.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "prompts.txt").write_text("\n".join(f"a {c} square" for c in RGB) + "\n")
    out["images"] = root / "images.jsonl"
    out["prompts"] = root / "prompts.txt"
    return out


FORMAT = {"npo": "pickapic", "dcpo": "dcpo", "mapo": "pickapic", "sft": "pickapic", "robust_dpo": "pickapic",
          "dpo_sft": "pickapic", "kto": "images", "dro": "images", "self_npo": "prompts"}
EXTRA = {
    "robust_dpo": ["label_smoothing=0.1"],
    "dpo_sft": ["sft_weight=0.5"],
    "kto": ["method_options.beta=100"],
    "dro": ["method_options.sampler_steps=3", "method_options.buffer_size=2"],
    "self_npo": ["method_options.num_ddim_timesteps=10", "method_options.teacher_steps=2"],
    "npo": ["beta_dpo=1000"],
    "dcpo": ["beta_dpo=500"],
}
SLOW = pytest.mark.slow
CASES = [
    ("npo", "sd", False), ("npo", "sdxl", True), pytest.param("npo", "sd3", True, marks=SLOW),
    ("self_npo", "sd", False), pytest.param("self_npo", "sdxl", False, marks=SLOW),
    pytest.param("self_npo", "sd3", False, marks=SLOW),
    ("dcpo", "sd", False), ("dcpo", "sdxl", True), pytest.param("dcpo", "sd3", False, marks=SLOW),
    ("dro", "sd", False), pytest.param("dro", "sdxl", True, marks=SLOW), pytest.param("dro", "sd3", False, marks=SLOW),
    ("kto", "sd", True), pytest.param("kto", "sdxl", False, marks=SLOW),
    ("mapo", "sd", False), pytest.param("mapo", "sdxl", True, marks=SLOW), pytest.param("mapo", "sd3", False, marks=SLOW),
    ("sft", "sd", False), pytest.param("sft", "sd3", True, marks=SLOW),
    ("robust_dpo", "sd", True), ("dpo_sft", "sd", False),
]


def run_train(tmp_path: Path, model: str, method: str, data_file: Path, fmt: str, lora: bool, *extra: str) -> Path:
    cfg = {
        "method": method, "pretrained_model_name_or_path": model, "output_dir": str(tmp_path / "out"),
        "resolution": 32, "train_batch_size": 2, "max_train_steps": 1, "learning_rate": 1e-4,
        "checkpointing_steps": 1000, "report_to": "none",
        "data": {"format": fmt, "data_files": [str(data_file)]},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["train", str(path), "--set", f"use_lora={str(lora).lower()}", "--set", "rank=4"]
    for item in extra:
        args += ["--set", item]
    assert main(args) == 0
    return tmp_path / "out"


@pytest.mark.parametrize("method,family,lora", CASES)
def test_one_step(tmp_path, tiny_model_factory, data, method, family, lora):
    fmt = FORMAT[method]
    out = run_train(tmp_path, tiny_model_factory(family), method, data["pickapic" if fmt == "dcpo" else fmt],
                    fmt, lora, *EXTRA.get(method, []))
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 1 and np.isfinite(logs[0]["loss"])
    net = "transformer" if family == "sd3" else "unet"
    if lora:
        assert (out / "pytorch_lora_weights.safetensors").is_file()
    else:
        assert (out / net / "config.json").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    if method == "npo":
        assert saved["data"]["reverse_labels"] is True  # NPO trains on reversed preferences


def test_npo_feeds_the_rejected_image_as_winner(tiny_sd, data):
    """After method npo is set up, the loader's winner is the human-rejected image of each pair."""
    from diffusion_po.config import load_train_config
    from diffusion_po.data import build_train_data
    from diffusion_po.objectives import get_method_class

    batches = {}
    for method in ("dpo", "npo"):
        cfg = load_train_config(None, [f"pretrained_model_name_or_path={tiny_sd}", f"method={method}",
                                       "data.format=pickapic", f"data.data_files=[{data['pickapic']}]"])
        get_method_class(method)(cfg)
        loaded = build_train_data(cfg.data, 32, 2, 0, 1, cfg.seed)
        batches[method] = next(iter(loaded.loader))
    assert torch.equal(batches["npo"]["pixels_w"], batches["dpo"]["pixels_l"])
    assert torch.equal(batches["npo"]["pixels_l"], batches["dpo"]["pixels_w"])


MY_CONFIGS = ["sd15_npo_lora", "sdxl_npo_lora", "sd15_self_npo", "sdxl_self_npo", "sd21_dcpo", "sd15_dcpo",
              "sdxl_dcpo_lora", "sd15_dro", "sdxl_dro", "sd15_kto", "sdxl_kto_lora", "sdxl_mapo", "sdxl_mapo_lora",
              "sd15_mapo"]


@pytest.mark.parametrize("name", MY_CONFIGS)
def test_recipe_configs_validate(name):
    """Every shipped recipe loads, validates, and its method accepts its method_options and data format."""
    from diffusion_po.config import load_train_config
    from diffusion_po.objectives import get_method_class

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    cfg = load_train_config(path)
    cls = get_method_class(cfg.method)
    assert cfg.data.format in cls.data_formats
    cls(cfg)


@pytest.mark.parametrize("method", ["self_npo", "dro"])
def test_checkpoint_and_resume(tmp_path, tiny_sd, data, method):
    """Method state (Self-NPO's teacher, DRO's counters) goes through accelerate checkpoints and resume."""
    fmt = FORMAT[method]
    out = run_train(tmp_path, tiny_sd, method, data[fmt], fmt, False, *EXTRA[method], "checkpointing_steps=1")
    assert (out / "checkpoint-1").is_dir()
    out = run_train(tmp_path, tiny_sd, method, data[fmt], fmt, False, *EXTRA[method], "checkpointing_steps=1",
                    "max_train_steps=2", "resume_from_checkpoint=latest")
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logs] == [1, 2]
