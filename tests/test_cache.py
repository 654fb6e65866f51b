"""The encoded-data cache: training from it gives the same batches and losses as training from the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_po.cli import main
from diffusion_po.config import load_train_config
from diffusion_po.errors import DataError, UserError
from tests.helpers import write_pickapic


def _config(tmp_path: Path, model: str, data_file: Path, name: str, **overrides) -> Path:
    cfg = {
        "pretrained_model_name_or_path": model,
        "output_dir": str(tmp_path / name),
        "resolution": 32,
        "train_batch_size": 2,
        "max_train_steps": 3,
        "learning_rate": 1e-3,
        "beta_dpo": 50.0,
        "checkpointing_steps": 1000,
        "report_to": "none",
        "data": {"format": "pickapic", "data_files": [str(data_file)], "cache_dir": str(tmp_path / "caches")},
    }
    data_over = overrides.pop("data", {})
    cfg.update(overrides)
    cfg["data"].update(data_over)
    if cfg["beta_dpo"] is None:  # a method without a DPO beta (sft) refuses the key
        del cfg["beta_dpo"]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: list[dict], b: list[dict], keys=("loss", "model_diff", "ref_diff")) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["bad_rows"] == rb["bad_rows"]
        for k in keys:
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=2e-3, abs=1e-6), (k, ra, rb)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    # 2 ties (dropped), one undecodable loser (row 5): the bad row and the ties must line up in both paths
    return write_pickapic(tmp_path_factory.mktemp("cache_data") / "train.parquet", n=8, ties=2, corrupt=[5])


def test_cached_training_matches_files(tmp_path, tiny_sd, pairs_file):
    """Same losses, bad-row counts and optimiser trajectory, with random flips and prompt dropout."""
    common = dict(proportion_empty_prompts=0.3, max_train_steps=3)  # one epoch: the bad row is met
    files = _config(tmp_path, tiny_sd, pairs_file, "files", **common)
    assert main(["train", str(files)]) == 0
    assert main(["data", "cache", str(files), "--dtype", "fp32", "--batch-size", "3"]) == 0
    cached = _config(tmp_path, tiny_sd, pairs_file, "cached", data={"format": "cache"}, **common)
    assert main(["train", str(cached)]) == 0
    a, b = _metrics(tmp_path / "files"), _metrics(tmp_path / "cached")
    assert a[-1]["bad_rows"] >= 1
    _assert_same_run(a, b)
    assert abs(a[-1]["loss"] - a[0]["loss"]) > 1e-6  # the runs moved: the comparison is not trivial

    folder = next((tmp_path / "caches").glob("*/32px"))
    meta = json.loads((folder / "cache.json").read_text())
    assert meta["flips"] and meta["source_format"] == "pickapic" and meta["num_rows"] == 6  # 8 minus 2 ties
    assert list(meta["bad_rows"]) == ["5"]
    # a second cache run refuses to clobber
    assert main(["data", "cache", str(files)]) == 2


def test_cached_batch_equals_file_batch_sdxl(tmp_path, tiny_model_factory, pairs_file):
    """SDXL: cached prompt embeddings + per-image size/crop ids give the very conditioning of the file path."""
    from diffusion_po.data.cache import write_cache
    from diffusion_po.training.trainer import Trainer

    model = tiny_model_factory("sdxl")
    files = load_train_config(_config(tmp_path, model, pairs_file, "f"))
    write_cache(files, dtype="fp32", progress=False)
    cached = load_train_config(_config(tmp_path, model, pairs_file, "c", data={"format": "cache"}))
    tf, tc = Trainer(files), Trainer(cached)
    bf = next(iter(tf.build_data().loader))
    bc = next(iter(tc.build_data().loader))
    assert bf["captions"] == bc["captions"] and bf["row_ids"] == bc["row_ids"]
    torch.testing.assert_close(bf["original_sizes"], bc["original_sizes"])
    cf = tf.context.encode_prompts(bf["captions"], bf)
    cc = tc.context.encode_prompts(bc["captions"], bc)
    assert cf.keys() == cc.keys() == {"prompt_embeds", "text_embeds", "time_ids"}
    for k in cf:
        torch.testing.assert_close(cf[k], cc[k], rtol=1e-5, atol=1e-5)
    lf = tf.context.latents(bf, "w")
    lc = tc.context.latents(bc, "w")  # both trainers' generators are at the same point
    torch.testing.assert_close(lf, lc, rtol=1e-4, atol=1e-4)


def test_cache_for_another_model_or_resolution_is_refused(tmp_path, tiny_model_factory, pairs_file):
    from diffusion_po.data.cache import write_cache
    from diffusion_po.training.trainer import train

    sd = tiny_model_factory("sd")
    write_cache(load_train_config(_config(tmp_path, sd, pairs_file, "w", data={"random_flip": False})),
                progress=False)
    other_res = load_train_config(_config(tmp_path, sd, pairs_file, "r", resolution=64,
                                          data={"format": "cache", "random_flip": False}))
    with pytest.raises(DataError, match=r"no cache for model .* at 64 px; it holds caches for: model .* at 32 px"):
        train(other_res)
    other_model = load_train_config(_config(tmp_path, tiny_model_factory("sd3"), pairs_file, "m",
                                            data={"format": "cache", "random_flip": False}))
    with pytest.raises(DataError, match="no cache for model"):
        train(other_model)
    # pointed straight at the cache folder: the message names what it was made for
    folder = next((tmp_path / "caches").glob("*/32px"))
    direct = load_train_config(_config(tmp_path, tiny_model_factory("sd3"), pairs_file, "d",
                                       data={"format": "cache", "cache_dir": str(folder), "random_flip": False}))
    with pytest.raises(DataError, match="was made for model .*VAE/text encoders differ"):
        train(direct)
    # made without mirrored copies: random_flip must be off
    flip = load_train_config(_config(tmp_path, sd, pairs_file, "fl", data={"format": "cache"}))
    with pytest.raises(DataError, match="random_flip"):
        train(flip)


def test_cache_command_errors(tmp_path, tiny_sd, pairs_file, capsys):
    cfg = _config(tmp_path, tiny_sd, pairs_file, "e", data={"format": "cache"})
    assert main(["data", "cache", str(cfg)]) == 2
    assert "--format" in capsys.readouterr().err
    cfg = _config(tmp_path, tiny_sd, pairs_file, "e2", data={"random_crop": True})
    assert main(["data", "cache", str(cfg)]) == 2
    assert "one crop per image" in capsys.readouterr().err
    cfg = _config(tmp_path, tiny_sd, pairs_file, "e3", data={"cache_dir": None})
    assert main(["data", "cache", str(cfg)]) == 2
    assert "data.cache_dir" in capsys.readouterr().err
    cfg = load_train_config(_config(tmp_path, tiny_sd, pairs_file, "e4", data={"format": "cache", "cache_dir": None}))
    from diffusion_po.training.trainer import train

    with pytest.raises(DataError, match="cache_dir is not set"):
        train(cfg)


@pytest.mark.slow
def test_dcpo_and_images_caches(tmp_path, tiny_sd, pairs_file):
    """Per-image captions (DCPO) and unpaired images (SFT) train from a cache with the file path's losses."""
    from diffusion_po.data.cache import write_cache

    for fmt, method in (("dcpo", "dcpo"), ("images", "sft")):
        if fmt == "images":
            import pyarrow.parquet as pq

            t = pq.read_table(pairs_file).to_pydict()
            import pyarrow as pa

            data = tmp_path / "images.parquet"
            pq.write_table(pa.table({"image": t["jpg_0"], "caption": t["caption"]}), data)
        else:
            data = pairs_file
        beta = {"beta_dpo": None} if method == "sft" else {}
        files = load_train_config(_config(tmp_path, tiny_sd, data, f"{fmt}_f", method=method, max_train_steps=2,
                                          data={"format": fmt, "cache_dir": str(tmp_path / fmt)}, **beta))
        assert main(["train", str(tmp_path / f"{fmt}_f.yaml")]) == 0
        write_cache(files, dtype="fp32", progress=False)
        assert main(["train", str(_config(tmp_path, tiny_sd, data, f"{fmt}_c", method=method, max_train_steps=2,
                                          data={"format": "cache", "cache_dir": str(tmp_path / fmt)}, **beta))]) == 0
        _assert_same_run(_metrics(tmp_path / f"{fmt}_f"), _metrics(tmp_path / f"{fmt}_c"), keys=("loss",))
    # a method that needs another kind of rows says so
    wrong = load_train_config(_config(tmp_path, tiny_sd, pairs_file, "wrong", method="dpo",
                                      data={"format": "cache", "cache_dir": str(tmp_path / "images")}))
    from diffusion_po.training.trainer import train

    with pytest.raises(DataError, match="holds 'images' rows; method 'dpo' takes"):
        train(wrong)


def test_fingerprint_ignores_bf16_cast(tiny_sd):
    from diffusion_po.data.cache import fingerprint
    from diffusion_po.families import load_family

    fam = load_family(tiny_sd)
    fp = fingerprint(fam)
    for enc in fam.text_encoders:
        enc.to(torch.bfloat16)
    assert fingerprint(fam) == fp
    with torch.no_grad():
        fam.vae.encoder.conv_in.weight.mul_(1.5)
    assert fingerprint(fam) != fp


def test_unknown_dtype_and_format(tmp_path, tiny_sd, pairs_file):
    from diffusion_po.data.cache import write_cache

    cfg = load_train_config(_config(tmp_path, tiny_sd, pairs_file, "x"))
    with pytest.raises(UserError, match="--dtype"):
        write_cache(cfg, dtype="int8")
    with pytest.raises(UserError, match="cannot cache"):
        write_cache(cfg, source_format="parquet")
