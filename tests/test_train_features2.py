"""Training features of the diffusers examples: snr_gamma, noise_offset, num_train_epochs, aspect-ratio
buckets, DoRA, allow_tf32."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diffusion_po.config import load_train_config, steps_for_epochs
from diffusion_po.errors import ConfigError
from tests.helpers import write_pickapic
from tests.test_train import make_config, read_metrics


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    return write_pickapic(tmp_path_factory.mktemp("feat2") / "train.parquet", n=16)


def _trainer(tmp_path, model, data_file, **overrides):
    from diffusion_po.training.trainer import Trainer

    return Trainer(load_train_config(make_config(tmp_path, model, data_file, **overrides)))


def _abar_by_hand(t: int, beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000) -> float:
    """alphas_cumprod of the scaled_linear schedule of the tiny models, from the formula."""
    lo, hi = math.sqrt(beta_start), math.sqrt(beta_end)
    betas = [(lo + (hi - lo) * k / (steps - 1)) ** 2 for k in range(steps)]
    return math.prod(1 - b for b in betas[: t + 1])


# ---------------------------------------------------------------- snr_gamma
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_by_hand(tiny_model_factory, prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from diffusion_po.families import load_family

    family = load_family(tiny_model_factory("sd", prediction_type))
    t = torch.tensor([0, 100, 300, 600, 999])
    got = family.min_snr_weights(t, 5.0)
    expected = []
    for step in t.tolist():
        abar = _abar_by_hand(step)
        snr = abar / (1 - abar)
        expected.append(min(snr, 5.0) / (snr if prediction_type == "epsilon" else snr + 1))
    assert got.tolist() == pytest.approx(expected, rel=1e-4)
    assert got[0] < 0.01  # SNR ~ 1000 at t=0: clipped to gamma 5
    if prediction_type == "epsilon":
        assert got[-1] == pytest.approx(1.0)  # SNR < gamma: unweighted
    # and as diffusers' training examples weigh their MSE (compute_snr + the min/snr stack)
    snr = compute_snr(DDPMScheduler.from_config(family.pipe.scheduler.config), t)
    ref = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    ref = ref / snr if prediction_type == "epsilon" else ref / (snr + 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_snr_gamma_weighs_policy_and_reference_alike(tmp_path, tiny_model_factory, data16):
    """The shared error path multiplies err and ref_err by the same w(t): each ratio to the unweighted
    errors (same draws) is min(SNR, gamma)/SNR at the pair's timestep."""
    from diffusion_po.objectives.paired import paired_errors

    trainer = _trainer(tmp_path, tiny_model_factory("sd"), data16, use_lora=True)
    ctx = trainer.context
    batch = next(iter(trainer.build_data().loader))
    drawn = []
    timesteps = ctx.timesteps
    ctx.timesteps = lambda n: drawn.append(timesteps(n)) or drawn[-1]
    state = ctx.generator.get_state()
    plain = paired_errors(ctx, batch)
    ctx.generator.set_state(state)
    ctx.config = dataclasses.replace(ctx.config, snr_gamma=2.0)
    weighted = paired_errors(ctx, batch)
    torch.testing.assert_close(drawn[0], drawn[1])
    w = trainer.family.min_snr_weights(drawn[0], 2.0)
    assert (w < 1).any()
    for key in ("err_w", "err_l", "ref_err_w", "ref_err_l"):
        torch.testing.assert_close(weighted[key], plain[key] * w, rtol=1e-5, atol=1e-8)


def test_snr_gamma_and_noise_offset_train(tmp_path, tiny_model_factory, data16):
    """A DPO LoRA run with both: the first loss is still log 2 (policy == reference, weighted alike)."""
    from diffusion_po.cli import main

    cfg = make_config(tmp_path, tiny_model_factory("sd"), data16, use_lora=True, max_train_steps=2,
                      snr_gamma=5.0, noise_offset=0.1)
    assert main(["train", str(cfg)]) == 0
    rows = read_metrics(tmp_path / "out")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_snr_gamma_refused_where_it_does_not_apply(tmp_path, tiny_model_factory, data16):
    with pytest.raises(ConfigError, match="flow-matching"):
        _trainer(tmp_path, tiny_model_factory("sd3"), data16, use_lora=True, snr_gamma=5.0)
    for key, value in (("snr_gamma", 5.0), ("noise_offset", 0.1)):
        with pytest.raises(ConfigError, match=f"'{key}' is not supported by method 'dro'"):
            load_train_config(make_config(tmp_path, tiny_model_factory("sd"), data16, method="dro",
                                          data={"format": "images"}, **{key: value}))
    with pytest.raises(ConfigError, match="snr_gamma"):
        load_train_config(make_config(tmp_path, tiny_model_factory("sd"), data16, snr_gamma=0.0))


# ---------------------------------------------------------------- noise_offset
def test_noise_offset_adds_a_per_channel_constant(tmp_path, tiny_model_factory, data16):
    trainer = _trainer(tmp_path, tiny_model_factory("sd"), data16)
    ctx = trainer.context
    shape = (2, 4, 4, 4)
    state = ctx.generator.get_state()
    plain = ctx.randn(shape)
    ctx.generator.set_state(state)
    assert torch.equal(ctx.training_noise(shape), plain)  # off by default: the very same draw
    ctx.generator.set_state(state)
    ctx.config = dataclasses.replace(ctx.config, noise_offset=0.5)
    offset = ctx.training_noise(shape) - plain
    assert offset.abs().min() > 0
    torch.testing.assert_close(offset, offset[:, :, :1, :1].expand(shape))  # one value per sample and channel
    ctx.generator.set_state(state)
    ctx.randn(shape)
    torch.testing.assert_close(offset[:, :, 0, 0], 0.5 * ctx.randn((2, 4, 1, 1))[:, :, 0, 0])


# ---------------------------------------------------------------- num_train_epochs
def test_num_train_epochs_sets_the_steps(tmp_path, tiny_model_factory, data16):
    """16 rows, batch 4: 4 batches an epoch; with 3 micro-steps a step, 1 epoch is ceil(4/3) = 2 steps."""
    trainer = _trainer(tmp_path, tiny_model_factory("sd"), data16, use_lora=True, train_batch_size=4,
                       gradient_accumulation_steps=3, num_train_epochs=1)
    assert trainer.cfg.max_train_steps == 2
    trainer.run()
    assert trainer.state.step == 2 and trainer.state.micro_step == 6
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [1, 2]
    resumed = _trainer(tmp_path, tiny_model_factory("sd"), data16, use_lora=True, train_batch_size=4,
                       gradient_accumulation_steps=3, num_train_epochs=1, resume_from_checkpoint="latest")
    assert resumed.resume_path is not None and "max_train_steps" not in resumed.resume_changes
    base = load_train_config(make_config(tmp_path, tiny_model_factory("sd"), data16, num_train_epochs=5))
    assert steps_for_epochs(base, 8).max_train_steps == 40
    assert steps_for_epochs(dataclasses.replace(base, num_train_epochs=None), 8).max_train_steps == 1


def test_num_train_epochs_refuses_streaming(tmp_path, tiny_model_factory, data16):
    with pytest.raises(ConfigError, match="streaming"):
        load_train_config(make_config(tmp_path, tiny_model_factory("sd"), data16, num_train_epochs=1,
                                      data={"streaming": True}))


# ---------------------------------------------------------------- DoRA
def test_dora_trains_saves_and_loads_in_diffusers(tmp_path, tiny_model_factory, data16):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    model = tiny_model_factory("sd")
    trainer = _trainer(tmp_path, model, data16, use_lora=True, use_dora=True, max_train_steps=2,
                       learning_rate=1e-2, beta_dpo=50.0)
    trainer.run()
    rows = read_metrics(tmp_path / "out")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # the reference: adapters (DoRA too) off
    keys = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert any("lora_magnitude_vector" in k for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=gen)
    emb = torch.randn(1, 8, pipe.unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        base = pipe.unet(x, t, emb).sample
        pipe.load_lora_weights(str(tmp_path / "out"))
        loaded = pipe.unet(x, t, emb).sample
        trained = trainer.unwrapped.eval()(x, t, emb).sample
    assert not torch.allclose(base, trained, atol=1e-5)
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)


def test_dora_needs_lora(tmp_path, tiny_model_factory, data16):
    with pytest.raises(ConfigError, match="use_dora"):
        load_train_config(make_config(tmp_path, tiny_model_factory("sd"), data16, use_dora=True))


# ---------------------------------------------------------------- allow_tf32
def test_allow_tf32_sets_both_flags_on_cuda_only(monkeypatch):
    from diffusion_po.training.trainer import set_tf32

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    set_tf32(True, torch.device("cpu"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, True)
    set_tf32(True, torch.device("cuda"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    set_tf32(False, torch.device("cuda"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)


@pytest.mark.parametrize("allow", [True, False])
def test_allow_tf32_reaches_the_flags(tmp_path, tiny_model_factory, data16, monkeypatch, allow):
    """The trainer hands `allow_tf32` to set_tf32 with its device; on a (pretend) CUDA device that sets the flags."""
    import diffusion_po.training.trainer as trainer_mod

    calls = []
    real = trainer_mod.set_tf32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", not allow)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not allow)
    monkeypatch.setattr(trainer_mod, "set_tf32", lambda a, device: calls.append((a, device.type)) or
                        real(a, torch.device("cuda")))
    _trainer(tmp_path, tiny_model_factory("sd"), data16, allow_tf32=allow)
    assert calls == [(allow, "cpu")]
    assert torch.backends.cuda.matmul.allow_tf32 is allow and torch.backends.cudnn.allow_tf32 is allow


# ---------------------------------------------------------------- aspect-ratio buckets
BUCKETS = [[32, 32], [48, 32], [32, 48]]
#: jpg_0 size (w, h) per row: 6 landscape, 4 portrait, 6 square; jpg_1 always of another size
SIZES = [(60, 40)] * 6 + [(40, 64)] * 4 + [(40, 40)] * 6


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.helpers import RGB, jpeg_bytes, pickapic_rows

    rows = pickapic_rows(len(SIZES))
    colours = list(RGB.values())
    rows["jpg_0"] = [jpeg_bytes(colours[i % len(colours)], size=s, noise_seed=i) for i, s in enumerate(SIZES)]
    rows["jpg_1"] = [jpeg_bytes(colours[(i + 1) % len(colours)], size=(52, 36), noise_seed=100 + i)
                     for i in range(len(SIZES))]
    path = tmp_path_factory.mktemp("buckets") / "train.parquet"
    pq.write_table(pa.table(rows), path)
    return path


def _bucket_data(path, start: int = 0, **data):
    from diffusion_po.config import DataConfig
    from diffusion_po.data.preference import build_train_data

    cfg = DataConfig(format="pickapic", data_files=[str(path)], aspect_buckets=True, buckets=BUCKETS, **data)
    return build_train_data(cfg, 32, 2, 0, 1, seed=3, start_micro_step=start)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_standard_buckets_and_nearest():
    from diffusion_po.data.preference import SDXL_BUCKETS, nearest_bucket, standard_buckets

    assert standard_buckets(1024) == list(SDXL_BUCKETS)
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in standard_buckets(512))
    assert standard_buckets(512)[0] == (512, 512)
    buckets = [tuple(b) for b in BUCKETS]
    assert [nearest_bucket(w, h, buckets) for w, h in [(60, 40), (40, 64), (40, 40), (1000, 10)]] == [1, 2, 0, 1]


def test_buckets_keep_pairs_together_one_bucket_a_batch(mixed_sizes):
    data = _bucket_data(mixed_sizes)
    assert data.batches_per_epoch == 3 + 2 + 3
    epochs = _take(data.loader, 2 * data.batches_per_epoch)
    for batch in epochs:
        w, h = BUCKETS[_bucket_index(SIZES[batch["row_ids"][0]])]
        assert {_bucket_index(SIZES[r]) for r in batch["row_ids"]} == {BUCKETS.index([w, h])}  # one bucket
        assert batch["pixels_w"].shape[-2:] == batch["pixels_l"].shape[-2:] == (h, w)  # both images of a pair
        assert batch["target_size"] == (h, w)
        # SDXL micro-conditioning: jpg_0's original (h, w), whichever image won
        assert batch["original_sizes"].tolist() == [[SIZES[r][1], SIZES[r][0]] for r in batch["row_ids"]]
    first = sorted(r for b in epochs[: data.batches_per_epoch] for r in b["row_ids"])
    assert first == list(range(len(SIZES)))  # every row once an epoch (no bucket has a remainder here)
    # deterministic from the seed, and a resume at micro-step 5 continues the same sequence
    again = _take(_bucket_data(mixed_sizes).loader, 2 * data.batches_per_epoch)
    assert [b["row_ids"] for b in again] == [b["row_ids"] for b in epochs]
    resumed = _take(_bucket_data(mixed_sizes, start=5).loader, 6)
    assert [b["row_ids"] for b in resumed] == [b["row_ids"] for b in epochs[5:11]]
    assert [b["row_ids"] for b in epochs[: data.batches_per_epoch]] != [b["row_ids"] for b in epochs[8:]]


def _bucket_index(size):
    from diffusion_po.data.preference import nearest_bucket

    return nearest_bucket(*size, [tuple(b) for b in BUCKETS])


def test_no_buckets_path_is_unchanged(mixed_sizes):
    """Without buckets every image is the square resolution crop, and the batch has no target_size."""
    from diffusion_po.config import DataConfig
    from diffusion_po.data.preference import PairTransform, build_train_data, decode_image
    from tests.helpers import jpeg_bytes

    data = build_train_data(DataConfig(format="pickapic", data_files=[str(mixed_sizes)]), 32, 2, 0, 1, seed=3)
    batch = next(iter(data.loader))
    assert batch["pixels_w"].shape[-2:] == (32, 32) and "target_size" not in batch
    image = decode_image(jpeg_bytes((10, 200, 30), size=(60, 40)))
    import random

    plain = PairTransform(32, random_crop=True)([image], random.Random(1))
    square = PairTransform(32, random_crop=True)([image], random.Random(1), target=(32, 32))
    assert torch.equal(plain[0], square[0]) and plain[1:] == square[1:]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_buckets_train(tmp_path, tiny_model_factory, mixed_sizes, family):
    """DPO LoRA on mixed aspect ratios; SDXL's time ids carry the bucket as the target size."""
    trainer = _trainer(tmp_path, tiny_model_factory(family), mixed_sizes, use_lora=True, max_train_steps=2,
                       beta_dpo=50.0, data={"aspect_buckets": True, "buckets": BUCKETS})
    assert any(b["target_size"] != (32, 32) for b in _take(trainer.build_data().loader, 2))  # the steps it trains
    if family == "sdxl":
        batch = next(b for b in trainer.build_data().loader if b["target_size"] != (32, 32))
        time_ids = trainer.context.encode_prompts(batch["captions"], batch)["time_ids"]
        assert time_ids[:, 4:].tolist() == [list(batch["target_size"])] * batch["size"]
    trainer.run()
    rows = read_metrics(tmp_path / "out")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and math.isfinite(rows[1]["loss"])


def test_bucket_config_errors(tmp_path, tiny_model_factory, mixed_sizes):
    model = tiny_model_factory("sd")
    for data, match in (({"buckets": BUCKETS}, "aspect_buckets is false"),
                        ({"aspect_buckets": True, "streaming": True}, "streaming"),
                        ({"aspect_buckets": True, "buckets": [[32]]}, r"data.buckets\[0\]"),
                        ({"aspect_buckets": True, "format": "prompts"}, "needs image data")):
        with pytest.raises(ConfigError, match=match):
            load_train_config(make_config(tmp_path, model, mixed_sizes, data=data))


def test_data_cache_refuses_buckets(tmp_path, tiny_model_factory, mixed_sizes):
    from diffusion_po.data.cache import write_cache
    from diffusion_po.errors import UserError

    cfg = load_train_config(make_config(tmp_path, tiny_model_factory("sd"), mixed_sizes,
                                        data={"aspect_buckets": True, "cache_dir": str(tmp_path / "cache")}))
    with pytest.raises(UserError, match="aspect_buckets"):
        write_cache(cfg, dtype="fp32", progress=False)
    assert not (tmp_path / "cache").exists()
