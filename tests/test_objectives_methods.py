"""The batch-building contracts of the methods, through the real trainer's context on tiny models:
per-image captions (DCPO, SD and SDXL), the v-prediction target, shared t and c but fresh noise (DRO),
independent noise (KTO), the Self-NPO teacher rollout against the reference algorithm, reference-free
methods never calling the reference."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffusion_po.config import load_train_config
from diffusion_po.errors import ConfigError, DataError

torch.set_num_threads(1)


def make_trainer(tmp_path, model: str, method: str, fmt: str, *extra: str):
    from diffusion_po.training.trainer import Trainer

    cfg = load_train_config(None, [
        f"pretrained_model_name_or_path={model}", f"output_dir={tmp_path / method}", "resolution=32",
        "report_to=none", f"method={method}", "train_batch_size=2", f"data.format={fmt}", *extra,
    ])
    return Trainer(cfg)


class Spy:
    """Wraps ctx.policy_predict / reference_predict and records their inputs."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x_t, t, cond):
        self.calls.append({"x_t": x_t.detach().clone(), "t": t.clone(), "cond": {k: v.clone() for k, v in cond.items()}})
        return self.fn(x_t, t, cond)


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def paired_batch(**extra):
    batch = {"pixels_w": pixels(2, 0), "pixels_l": pixels(2, 1), "captions": ["a red square", "a green square"],
             "size": 2}
    batch.update(extra)
    return batch


def implied_noise(family, x_t, x0, t):
    abar = family.noise_scheduler.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
def test_dcpo_per_image_captions_and_shared_noise(tmp_path, tiny_model_factory, family_name):
    tr = make_trainer(tmp_path, tiny_model_factory(family_name), "dcpo", "dcpo", "beta_dpo=500")
    ctx, fam = tr.context, tr.family
    spy = Spy(ctx.policy_predict)
    ctx.policy_predict = spy
    x0 = torch.randn(2, 4, 8, 8)
    ctx.latents = lambda batch, key: x0 if key == "w" else -x0
    batch = paired_batch(captions_w=["a red square", "a blue circle"], captions_l=["a green square", "a dog"])
    loss, metrics = tr.method.compute_loss(ctx, batch)
    assert torch.isfinite(loss)
    (call,) = spy.calls
    cond = call["cond"]
    want_w = fam.encode_prompts(batch["captions_w"], resolution=32)
    want_l = fam.encode_prompts(batch["captions_l"], resolution=32)
    for key in ("prompt_embeds", "text_embeds") if family_name == "sdxl" else ("prompt_embeds",):
        assert torch.allclose(cond[key][:2], want_w[key], atol=1e-5), key  # every encoder sees z_w ...
        assert torch.allclose(cond[key][2:], want_l[key], atol=1e-5), key  # ... and z_l
        assert not torch.allclose(cond[key][:2], cond[key][2:])
    t = call["t"]
    assert torch.equal(t[:2], t[2:])
    noise = implied_noise(fam, call["x_t"], torch.cat([x0, -x0]), t)
    assert torch.allclose(noise[:2], noise[2:], atol=1e-4)


def test_dcpo_needs_per_image_captions(tmp_path, tiny_sd):
    tr = make_trainer(tmp_path, tiny_sd, "dcpo", "dcpo")
    with pytest.raises(DataError, match="per-image captions"):
        tr.method.compute_loss(tr.context, paired_batch())
    with pytest.raises(DataError, match="data cache"):
        tr.method.compute_loss(tr.context, paired_batch(prompt_cond={}))


def test_dcpo_v_prediction_target(tmp_path, tiny_model_factory):
    """On a v-prediction model the target is v = alpha eps - sigma x0 (the reference forces eps)."""
    tr = make_trainer(tmp_path, tiny_model_factory("sd", "v_prediction"), "dcpo", "dcpo")
    ctx, fam = tr.context, tr.family
    x0 = torch.randn(2, 4, 8, 8)
    ctx.latents = lambda batch, key: x0 if key == "w" else 0.5 * x0
    x0_all = torch.cat([x0, 0.5 * x0])

    def v_oracle(x_t, t, cond):
        abar = fam.noise_scheduler.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps = (x_t - a * x0_all) / s
        return a * eps - s * x0_all

    ctx.policy_predict = v_oracle
    ctx.reference_predict = v_oracle
    batch = paired_batch(captions_w=["a", "b"], captions_l=["c", "d"])
    _, metrics = tr.method.compute_loss(ctx, batch)
    assert float(metrics["raw_model_loss"]) < 1e-8


def test_dro_shares_t_and_c_not_noise(tmp_path, tiny_sd):
    tr = make_trainer(tmp_path, tiny_sd, "dro", "images", "method_options.sampler_steps=4",
                      "method_options.policy_refresh_steps=2")
    ctx, method = tr.context, tr.method
    spy = Spy(lambda x_t, t, cond: torch.zeros_like(x_t))
    ctx.policy_predict = spy
    batch = {"pixels": pixels(2, 3), "captions": ["a red square", "a blue circle"], "size": 2}
    loss, metrics = method.compute_loss(ctx, batch)
    assert len(method.buffer) == 2
    (call,) = spy.calls
    t, cond = call["t"], call["cond"]
    assert torch.equal(t[:2], t[2:])
    assert torch.equal(cond["prompt_embeds"][:2], cond["prompt_embeds"][2:])
    # t comes from the sampler's jittered 4-step grid: 0..249 + 250 k
    assert set((t // 250).tolist()) <= {0, 1, 2, 3}
    # with a zero prediction the policy half's error is mean(eps_pol^2) of the sampled buffer entries
    # (the snapshot's own prediction), and the expert half's is mean(fresh eps^2)
    err_pol = metrics["policy"]
    buf = method.buffer.data
    preds = buf["pred"]  # (2, steps, ...); each sampled entry is one (entry, step)
    candidates = preds.pow(2).mean(dim=(2, 3, 4))
    assert any(abs(float(err_pol) - 0.5 * (float(a) + float(b))) < 1e-5
               for a in candidates.flatten() for b in candidates.flatten())
    # the expert noise is fresh: not the policy target
    x0 = buf["x0"]
    assert not torch.allclose(call["x_t"][:2], call["x_t"][2:])
    # the snapshot is refreshed every policy_refresh_steps micro-steps
    with torch.no_grad():
        for p in method_network(tr).parameters():
            p.add_(0.01)
    method.compute_loss(ctx, batch)  # micro-step 2: no refresh yet
    snap = next(method.snapshot.parameters())
    live = next(method_network(tr).parameters())
    assert not torch.allclose(snap, live)
    method.compute_loss(ctx, batch)  # micro-step 3 starts after 2 micro-steps: refresh
    assert torch.allclose(next(method.snapshot.parameters()), live)
    assert x0.shape[1:] == (4, 8, 8)


def method_network(tr):
    return tr.context.trainable_network


def test_kto_independent_noise_and_labels(tmp_path, tiny_sd):
    tr = make_trainer(tmp_path, tiny_sd, "kto", "images", "method_options.beta=10")
    ctx = tr.context
    spy = Spy(ctx.policy_predict)
    ctx.policy_predict = spy
    batch = {"pixels": pixels(2, 4), "captions": ["a", "b"], "labels": torch.tensor([1.0, 0.0]), "size": 2}
    loss, metrics = tr.method.compute_loss(ctx, batch)
    assert torch.isfinite(loss) and float(metrics["n_desirable"]) == 1.0
    # pairs: winners desirable, losers undesirable, each image its own t
    loss, metrics = tr.method.compute_loss(ctx, paired_batch())
    assert float(metrics["n_desirable"]) == 2.0
    t = spy.calls[-1]["t"]
    assert t.shape == (4,)
    with pytest.raises(DataError, match="label"):
        tr.method.compute_loss(ctx, {"pixels": pixels(2, 4), "captions": ["a", "b"], "size": 2})


@pytest.mark.parametrize("method", ["mapo", "sft"])
def test_reference_free_methods(tmp_path, tiny_sd, method):
    tr = make_trainer(tmp_path, tiny_sd, method, "pickapic")
    ctx = tr.context
    assert tr.reference is None  # full fine-tune without a frozen copy

    def boom(*args):
        raise AssertionError("reference called")

    ctx.reference_predict = boom
    spy = Spy(ctx.policy_predict)
    ctx.policy_predict = spy
    loss, _ = tr.method.compute_loss(ctx, paired_batch())
    assert torch.isfinite(loss)
    n = spy.calls[0]["x_t"].shape[0]
    assert n == (4 if method == "mapo" else 2)  # SFT runs the winners only


def test_robust_and_dpo_sft_need_their_keys(tmp_path, tiny_sd):
    with pytest.raises(ConfigError, match="label_smoothing"):
        make_trainer(tmp_path, tiny_sd, "robust_dpo", "pickapic")
    with pytest.raises(ConfigError, match="sft_weight"):
        make_trainer(tmp_path, tiny_sd, "dpo_sft", "pickapic")


class FakeNet(torch.nn.Module):
    """A 'UNet' whose output is a known function of (x, t, embeddings)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t, enc, **kwargs):
        return SimpleNamespace(sample=self.w * x + (t.float() / 1000).view(-1, 1, 1, 1) + enc.mean(dim=(1, 2)).view(-1, 1, 1, 1))


def reference_rollout(abar, x, start_t, cond, uncond, w, steps=5, n_ddim=25):
    """The reference's loop (Self-NPO/train.py), transcribed with its index bookkeeping."""
    ratio = 1000 // n_ddim
    grid = torch.arange(1, n_ddim + 1) * ratio - 1
    prev_abar = torch.cat([abar[:1], abar[grid[:-1]]])
    index = ((start_t + 1) // ratio - 1).long()
    t = start_t.clone()
    mask = torch.ones(len(t))

    def x0_eps(t_):
        a = abar[t_].sqrt().view(-1, 1, 1, 1)
        s = (1 - abar[t_]).sqrt().view(-1, 1, 1, 1)
        out_c = 0.3 * x + (t_.float() / 1000).view(-1, 1, 1, 1) + cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        out_u = 0.3 * x + (t_.float() / 1000).view(-1, 1, 1, 1) + uncond.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        x0_c, x0_u = (x - s * out_c) / a, (x - s * out_u) / a
        return x0_c + w * (x0_c - x0_u), out_c + w * (out_c - out_u)

    for i in range(steps + 1):
        pred_x0, pred_eps = x0_eps(t)
        if i >= steps:
            break
        ap = prev_abar[index].view(-1, 1, 1, 1)
        x_new = ap.sqrt() * pred_x0 + (1 - ap).sqrt() * pred_eps
        m = mask.view(-1, 1, 1, 1)
        x = x_new * m + x * (1 - m)
        index = index - 1
        mask = torch.where(index < 0, 0.0, mask)
        index = index.clamp(min=0)
        t = (t - ratio).clamp(min=0)
    return x, t, pred_x0


def test_self_npo_rollout_matches_the_reference_algorithm(tmp_path, tiny_sd):
    tr = make_trainer(tmp_path, tiny_sd, "self_npo", "prompts", "method_options.guidance=-5")
    ctx, fam, method = tr.context, tr.family, tr.method
    method.teacher = FakeNet()
    gen = torch.Generator().manual_seed(0)
    cond = {"prompt_embeds": torch.randn(4, 3, 5, generator=gen)}
    uncond = {"prompt_embeds": torch.zeros(4, 3, 5)}
    x = torch.randn(4, 4, 8, 8, generator=gen)
    t_s = torch.tensor([39, 119, 519, 999])
    ratio = 40
    x_e, t_e = method.rollout(ctx, x, t_s, (t_s - 5 * ratio).clamp(min=0), cond, uncond, -5.0, 5)
    pred = method._teacher_pred(ctx, x_e, t_e, cond, uncond, -5.0)
    target = fam.x0_from_prediction(x_e, pred, t_e)
    abar = fam.noise_scheduler.alphas_cumprod
    want_x, want_t, want_target = reference_rollout(abar, x, t_s, cond["prompt_embeds"], uncond["prompt_embeds"], -5.0)
    assert t_e.tolist() == want_t.tolist() == [0, 0, 319, 799]
    assert torch.allclose(x_e, want_x, atol=1e-4)
    assert torch.allclose(target, want_target, atol=1e-3)


def test_self_npo_step_images_and_own_samples(tmp_path, tiny_model_factory):
    tr = make_trainer(tmp_path, tiny_model_factory("sdxl"), "self_npo", "prompts")
    ctx, method = tr.context, tr.method
    assert method.w == -5.0 and method.uncond_kind == "auto"  # SDXL's Family.unconditional: zeros
    cond = ctx.encode_prompts(["a red square", "a dog"])
    unc = method._uncond(ctx, cond)
    assert torch.equal(unc["time_ids"], cond["time_ids"]) and float(unc["text_embeds"].abs().sum()) == 0.0
    assert float(unc["prompt_embeds"].abs().sum()) == 0.0
    spy = Spy(ctx.policy_predict)
    ctx.policy_predict = spy
    loss, m = method.compute_loss(ctx, {"captions": ["a red square", "a dog"], "size": 2})  # no images at all
    loss.backward()
    assert torch.isfinite(loss)
    assert float(m["t_prime"]) > float(m["t_end"]) - 1e-6  # the student only sees t' > t_e
    loss, m = method.compute_loss(ctx, {"captions": ["a", "b"], "pixels": pixels(2, 5), "size": 2})
    assert torch.isfinite(loss)
    # the teacher follows the student by EMA after an optimizer step
    student = ctx.trainable_network
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = next(method.teacher.parameters()).clone()
    method.on_optimizer_step(ctx, 1)
    after = next(method.teacher.parameters())
    assert torch.allclose(after, before + 0.001 * (next(student.parameters()) - before), atol=1e-6)


@pytest.mark.parametrize(("family", "explicit"), [("sd", "empty"), ("sdxl", "zeros")])
def test_self_npo_auto_uncond_is_the_family_policy(tmp_path, tiny_model_factory, family, explicit):
    """`uncond: auto` is `Family.unconditional` (the image's time ids kept): for SD1.x and standard SDXL the same
    numbers as the authors' explicit `empty` / `zeros`; an SDXL without force_zeros_for_empty_prompt gets ''."""
    path = tiny_model_factory(family)
    runs = {kind: make_trainer(tmp_path / kind, path, "self_npo", "prompts", f"method_options.uncond={kind}")
            for kind in ("auto", explicit)}
    cond = runs["auto"].context.encode_prompts(["a red square", "a dog"])
    auto, want = (runs[k].method._uncond(runs[k].context, cond) for k in ("auto", explicit))
    assert auto.keys() == want.keys() == cond.keys()
    for key in cond:
        assert torch.equal(auto[key], want[key]), key
    if family == "sdxl":
        tr = runs["auto"]
        tr.family.pipe.register_to_config(force_zeros_for_empty_prompt=False)
        tr.method._empty = None
        unc = tr.method._uncond(tr.context, cond)
        empty = tr.family.encode_prompts([""], resolution=tr.cfg.resolution)
        assert torch.equal(unc["prompt_embeds"], empty["prompt_embeds"].expand_as(cond["prompt_embeds"]))
        assert torch.equal(unc["time_ids"], cond["time_ids"])


def test_self_npo_teacher_state_round_trip(tmp_path, tiny_sd):
    tr = make_trainer(tmp_path, tiny_sd, "self_npo", "prompts", "use_lora=true", "rank=4")
    method, ctx = tr.method, tr.context
    with torch.no_grad():
        for name, p in method.teacher.named_parameters():
            if "lora" in name:
                p.add_(0.5)
    state = method.state_dict()
    assert state["teacher"] and all("lora" in k for k in state["teacher"])  # LoRA: only the adapter weights
    fresh = type(method)(tr.cfg)
    fresh.setup(ctx)
    fresh.load_state_dict(state)
    for (name, a), (_, b) in zip(method.teacher.named_parameters(), fresh.teacher.named_parameters()):
        assert torch.equal(a, b), name
