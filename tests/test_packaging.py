"""Packaging: LICENSE and the shipped configs in a built wheel, `diffusion-po configs`, training from a recipe
name, current hub ids only, and hub ids that fail at once when offline."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from diffusion_po import cli
from diffusion_po.errors import ModelLoadError
from diffusion_po.shipped import CONFIGS_DIR, config_names

REPO = Path(__file__).resolve().parents[1]


def test_wheel_holds_license_metadata_and_configs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "diffusion_po", src / "diffusion_po", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, cwd=tmp_path)
    (wheel,) = out.glob("diffusion_po-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        license_name = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        assert zf.read(license_name).decode() == (REPO / "LICENSE").read_text()
    assert "Apache License" in (REPO / "LICENSE").read_text() and "END OF TERMS AND CONDITIONS" in (
        REPO / "LICENSE").read_text()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Project-URL: Source, " in metadata
    shipped = {f"diffusion_po/configs/{name}.yaml" for name in config_names()}
    assert shipped and shipped <= set(names)
    accelerate = {f"diffusion_po/configs/accelerate/{p.name}" for p in (CONFIGS_DIR / "accelerate").glob("*.yaml")}
    assert accelerate <= set(names)


def test_configs_list_and_show(capsys):
    assert cli.main(["configs", "list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == config_names()
    assert cli.main(["configs", "show", "sd15_dpo_lora"]) == 0
    shown = capsys.readouterr().out
    assert yaml.safe_load(shown) == yaml.safe_load((CONFIGS_DIR / "sd15_dpo_lora.yaml").read_text())
    assert cli.main(["configs", "show", "no_such_recipe"]) == 2
    assert "shipped recipes" in capsys.readouterr().err


def test_train_accepts_a_shipped_recipe_name(monkeypatch):
    import diffusion_po.training.trainer as trainer

    seen = {}
    monkeypatch.setattr(trainer, "train", lambda cfg, config_source=None: seen.setdefault("cfg", cfg))
    assert cli.main(["train", "sd15_dpo_lora", "--output-dir", "runs/x"]) == 0
    recipe = yaml.safe_load((CONFIGS_DIR / "sd15_dpo_lora.yaml").read_text())
    assert seen["cfg"].method == recipe["method"]
    assert seen["cfg"].pretrained_model_name_or_path == recipe["pretrained_model_name_or_path"]


def test_no_retired_hub_ids_anywhere():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    hits = []
    for rel in tracked.splitlines():
        path = REPO / rel
        if path.suffix in {".py", ".md", ".yaml", ".ipynb", ".toml", ".txt"} and path.is_file():
            if "runwayml/" in path.read_text(errors="ignore") and path.name != "test_packaging.py":
                hits.append(rel)
    assert hits == [], f"retired hub id runwayml/stable-diffusion-v1-5 in {hits}"


@pytest.fixture
def never_load(monkeypatch):
    """Fail the test if the diffusers loader (which retries the hub for 20-40 s offline) is reached."""
    from diffusers import DiffusionPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained reached for a hub id that is neither cached nor reachable")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)


def test_offline_hub_id_fails_at_once(monkeypatch, never_load):
    from diffusion_po.families.base import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"not in the local Hugging Face cache and this machine is offline \(HF_HUB_OFFLINE is set\)"):
        load_pipeline("diffusion-po-tests/never-published")
    print(f"offline hub id failed after {time.perf_counter() - start:.3f} s")


def test_unreachable_hub_fails_at_once(monkeypatch, never_load):
    from diffusion_po import hub
    from diffusion_po.families.base import load_pipeline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: the connection is refused
    hub._endpoint_answers.cache_clear()
    try:
        with pytest.raises(ModelLoadError, match="the hub is unreachable"):
            load_pipeline("diffusion-po-tests/never-published")
    finally:
        hub._endpoint_answers.cache_clear()


def test_cached_hub_id_loads_from_the_cache_only(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from diffusion_po.hub import hub_local_only

    snapshot = tmp_path / "models--org--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (tmp_path / "models--org--cached" / "refs").mkdir()
    (tmp_path / "models--org--cached" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_local_only("org/cached") is True
    with pytest.raises(ModelLoadError):
        hub_local_only("org/not-cached")
    assert hub_local_only(str(tmp_path)) is False  # a local folder never asks the hub


def test_eval_loader_fails_at_once_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    from diffusion_po import hub
    from diffusion_po.eval.models import resolve_dir

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("DIFFUSION_PO_MODELS_ROOT", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub._endpoint_answers.cache_clear()
    try:
        with pytest.raises(ModelLoadError, match="the hub is unreachable and it is not in the local cache"):
            resolve_dir("pickscore", override="diffusion-po-tests/never-published")
    finally:
        hub._endpoint_answers.cache_clear()
