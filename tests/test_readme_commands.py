"""The README's Train commands, as written there, run on tiny models (the model, data and size swapped in
with --set, everything else as the README says). Sample and Evaluate: tests/test_sampling_cli.py and
tests/test_eval_pipeline.py; the Quick start main job: tests/test_toy_slow.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from tests.helpers import write_pickapic

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> list[str]:
    """The commands of the first ```bash block under `## heading` (comments dropped)."""
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = []
    for raw in block.replace("\\\n", " ").splitlines():
        line = raw.split("  #", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def with_values(argv: list[str], values: dict[str, str]) -> list[str]:
    """argv with the values of the flags in `values` replaced (paths and hub ids swapped for local ones)."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in values:
            out[i + 1] = values[arg]
    missing = set(values) - set(out)
    assert not missing, f"the README command has no {missing}"
    return out


def test_readme_train_commands_run(tmp_path, tiny_model_factory, capsys, monkeypatch):
    from diffusion_po.cli import main

    commands = readme_block("Train")
    assert any("--resume" in c for c in commands) and any("configs list" in c for c in commands)
    data = write_pickapic(tmp_path / "pairs.parquet", n=8)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the README's paths are relative to the clone
    ran = 0
    for command in commands:
        for part in command.split("&&"):
            argv = shlex.split(part)
            if argv[0] == "accelerate":  # several processes: tests/test_train.py runs torchrun with 2
                continue
            assert argv[0] == "diffusion-po", part
            argv = argv[1:]
            if argv[0] == "train":
                name = Path(argv[1]).stem
                model = tiny_model_factory("sdxl" if "sdxl" in name else "sd")
                argv += ["--set", f"pretrained_model_name_or_path={model}", "--set", "pretrained_vae_model_name_or_path=null",
                         "--set", f"output_dir={tmp_path / name}", "--set", f"data.data_files=[{data}]",
                         "--set", "resolution=32", "--set", "train_batch_size=2", "--set", "total_batch_size=null",
                         "--set", "gradient_accumulation_steps=1", "--set", "mixed_precision=no",
                         "--set", "report_to=none", "--set", "checkpointing_steps=1",
                         "--set", f"max_train_steps={2 if '--resume' in argv else 1}"]
            assert main(argv) == 0, part
            ran += 1
    out = capsys.readouterr().out
    assert ran >= 5 and "sd15_dpo_lora" in out
    assert (tmp_path / "sd15_dpo" / "unet" / "config.json").is_file()
    assert (tmp_path / "sdxl_dpo_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "sd15_dpo_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "resumed from" in out  # the --resume line continued the first run


def test_readme_sample_command_runs(tmp_path, tiny_model_factory):
    from diffusion_po.cli import main
    from tests.test_eval_pipeline import _tiny_lora

    (command,) = readme_block("Sample")
    model = tiny_model_factory("sd")
    lora = _tiny_lora(model, tmp_path / "sd15_dpo_lora")
    argv = with_values(shlex.split(command)[1:], {"--model": model, "--lora": str(lora),
                                                  "--output-dir": str(tmp_path / "samples")})
    assert main([*argv, "--steps", "2", "--no-progress"]) == 0
    assert (tmp_path / "samples" / "grid.png").is_file()
    assert len(list((tmp_path / "samples").glob("*.png"))) == 8 + 1  # seeds 0-7 and the grid


def test_readme_evaluate_command_runs(tmp_path, tiny_model_factory):
    from diffusion_po.cli import main
    from diffusion_po.eval.testing import build_tiny_models_root, tiny_checkpoint_options
    from tests.test_eval_pipeline import _tiny_lora

    (command,) = readme_block("Evaluate")
    model = tiny_model_factory("sd")
    lora = _tiny_lora(model, tmp_path / "sd15_dpo_lora")
    root = tmp_path / "eval-models"
    build_tiny_models_root(root)
    out = tmp_path / "bench"
    argv = with_values(shlex.split(command)[1:], {"--model": model, "--lora": str(lora), "--out": str(out),
                                                  "--models-root": str(root)})
    assert main([*argv, "--checkpoint", tiny_checkpoint_options(root)[0], "--limit", "2", "--steps", "2",
                 "--n-boot", "50", "--num-workers", "0"]) == 0
    assert (out / "report.md").is_file()
