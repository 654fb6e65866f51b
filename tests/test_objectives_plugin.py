"""Methods from outside the package (`method: module:Class`): the IPO example of docs/methods.md trains a step
on a tiny model and its loss equals a hand computation; bad dotted paths and an undeclared reference are
clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_po.config import load_train_config
from diffusion_po.errors import ConfigError
from diffusion_po.objectives import Method
from tests.helpers import write_pickapic

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
IPO_DIR = ROOT / "examples" / "ipo"
IPO_YAML = IPO_DIR / "ipo.yaml"


@pytest.fixture()
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def tiny_overrides(tmp_path: Path, model: str, **extra) -> list[str]:
    keys = {"pretrained_model_name_or_path": model, "output_dir": str(tmp_path / "out"), "resolution": 32,
            "train_batch_size": 2, "gradient_accumulation_steps": 1, "max_train_steps": 1, "mixed_precision": "'no'",
            "rank": 4, "report_to": "none", "checkpointing_steps": 1000, "lr_warmup_steps": 0,
            "data.data_files": f"[{write_pickapic(tmp_path / 'pp.parquet', n=4)}]", **extra}
    return [f"{k}={v}" for k, v in keys.items()]


def test_ipo_example_by_dotted_path_trains_a_step(tmp_path, tiny_sd, monkeypatch, fresh_accelerate_state):
    """`diffusion-po train examples/ipo/ipo.yaml` (method ipo:IPO) on a tiny model; at the LoRA's first step the
    policy is the reference, so h = 0 and the logged loss is (0 - 1/(2 tau))^2 = 1/(4 tau^2) exactly."""
    from diffusion_po.cli import main

    monkeypatch.syspath_prepend(str(IPO_DIR))
    args = ["train", str(IPO_YAML)]
    for item in tiny_overrides(tmp_path, tiny_sd):
        args += ["--set", item]
    assert main(args) == 0
    out = tmp_path / "out"
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tau = yaml.safe_load(IPO_YAML.read_text())["method_options"]["tau"]
    assert logs[0]["loss"] == pytest.approx(1 / (4 * tau**2), rel=1e-6) and logs[0]["reward_margin"] == 0.0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    saved = load_train_config(out / "config.yaml")  # the run's config round-trips, the method by its path
    assert saved.method == "ipo:IPO" and saved.method_options == {"beta_dpo": 5000.0, "tau": tau}


def test_ipo_loss_equals_a_hand_computation(tmp_path, tiny_sd, monkeypatch, fresh_accelerate_state):
    """A full fine-tune with the policy moved off the reference: the method's loss from the recorded noise,
    timesteps and predictions, computed by hand."""
    from diffusion_po.training.trainer import Trainer

    monkeypatch.syspath_prepend(str(IPO_DIR))
    cfg = load_train_config(IPO_YAML, tiny_overrides(tmp_path, tiny_sd, use_lora="false", beta_dpo=200,
                                                    **{"method_options.tau": 0.5}))
    tr = Trainer(cfg)
    assert tr.reference is not None  # needs_reference: a frozen copy is kept for full fine-tunes
    with torch.no_grad():
        for i, p in enumerate(tr.unwrapped.parameters()):
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    ctx, fam = tr.context, tr.family
    noises, calls = [], {"policy": [], "reference": []}

    def record(fn, store):
        def wrapped(*args):
            out = fn(*args)
            store.append((args[1].clone(), out.detach().clone()))
            return out
        return wrapped

    draw = ctx.randn
    ctx.randn = lambda shape: noises.append(draw(shape)) or noises[-1]
    ctx.policy_predict = record(ctx.policy_predict, calls["policy"])
    ctx.reference_predict = record(ctx.reference_predict, calls["reference"])
    g = torch.Generator().manual_seed(5)
    x_w, x_l = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    batch = {"latents_w": x_w, "latents_l": x_l, "captions": ["a red square", "a blue square"], "size": 2}
    loss, metrics = tr.method.compute_loss(ctx, batch)

    (t, pred), (_, ref_pred) = calls["policy"][0], calls["reference"][0]
    target = fam.training_target(torch.cat([x_w, x_l]), noises[0].repeat(2, 1, 1, 1), t)
    err = [float(((pred[i] - target[i]) ** 2).mean()) for i in range(4)]
    ref = [float(((ref_pred[i] - target[i]) ** 2).mean()) for i in range(4)]
    beta, tau = 200.0, 0.5
    hs = [-(beta / 2) * ((err[i] - err[i + 2]) - (ref[i] - ref[i + 2])) for i in range(2)]
    expected = sum((h - 1 / (2 * tau)) ** 2 for h in hs) / 2
    assert abs(hs[0]) > 1e-3  # the policy really differs from the reference
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert float(metrics["reward_margin"]) == pytest.approx(sum(hs) / 2, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("method,match", [
    ("no_such_module_xyz:IPO", r"cannot import module 'no_such_module_xyz'.*PYTHONPATH"),
    ("ipo:Nope", r"module 'ipo' has no 'Nope'"),
    ("ipo:loss", r"'ipo:loss' is not a Method subclass"),
    ("ipo:", r"a dotted path is module:Class"),
])
def test_bad_dotted_method_paths(tmp_path, monkeypatch, method, match):
    monkeypatch.syspath_prepend(str(IPO_DIR))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"pretrained_model_name_or_path": "m", "method": method}))
    with pytest.raises(ConfigError, match=match):
        load_train_config(path)


def test_dotted_method_options_are_checked(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(IPO_DIR))
    with pytest.raises(ConfigError, match=r"key 'sft_weight' is not read by method 'ipo:IPO' \(its options: beta_dpo, tau\)"):
        load_train_config(IPO_YAML, ["sft_weight=1"])
    with pytest.raises(ConfigError, match=r"method_options\.tau must be positive"):
        load_train_config(IPO_YAML, ["method_options.tau=0"])


class ReferenceFreeButCalls(Method):
    """Declares no reference, then asks for one (what the trainer must refuse)."""

    needs_reference = False

    def compute_loss(self, ctx, batch):
        x = ctx.latents(batch, "w")
        t = ctx.timesteps(x.shape[0])
        return ctx.reference_predict(x, t, ctx.encode_prompts(batch["captions"], batch)).mean(), {}


def test_reference_without_declaring_it_is_an_error(tmp_path, tiny_sd, fresh_accelerate_state):
    from diffusion_po.training.trainer import Trainer

    cfg = load_train_config(None, tiny_overrides(tmp_path, tiny_sd, use_lora="false",
                                                 method=f"{__name__}:ReferenceFreeButCalls"))
    tr = Trainer(cfg)
    assert tr.reference is None  # nothing kept: under full fine-tuning the "reference" would be the policy
    batch = {"latents_w": torch.zeros(2, 4, 4, 4), "captions": ["a", "b"], "size": 2}
    with pytest.raises(RuntimeError, match=r"calls ctx.reference_predict but declares needs_reference = False"):
        tr.method.compute_loss(tr.context, batch)


def test_docs_show_the_shipped_example():
    """docs/methods.md "Adding a method" shows examples/ipo/ipo.py and ipo.yaml as shipped (one source)."""
    docs = (ROOT / "docs" / "methods.md").read_text()
    assert f"```python\n{(IPO_DIR / 'ipo.py').read_text()}```" in docs
    assert f"```yaml\n{IPO_YAML.read_text()}```" in docs
