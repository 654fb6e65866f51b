"""The run's model card (`output_dir/README.md`) and the upload of the run to the Hugging Face hub.

The card says what was trained (base model, method and its options, data, key settings), shows the
validation grids, evaluation numbers when there are some (`output_dir/eval/summary.json` or the
`compare.json` of `diffusion-po eval compare --out output_dir/eval`, else the last validation score), and
how to load the weights with stock diffusers. Its metadata is huggingface_hub's `ModelCardData`; nothing
here needs the network except `push_to_hub`, which runs after everything is saved locally.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusion_po.config import TrainConfig
from diffusion_po.errors import UserError

if TYPE_CHECKING:
    from diffusion_po.training.trainer import Trainer
    from diffusion_po.training.validation import Validation

CARD_FILE = "README.md"
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".*", ".*/**"]
"""What `push_to_hub` leaves out: the training checkpoints and the hidden run files (lock, partial folders)."""


def _is_hub_id(path: str) -> bool:
    return not Path(path).expanduser().exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))


def _eval_numbers(output_dir: Path, last_scores: dict[str, float]) -> tuple[str, dict[str, Any]]:
    """(where the numbers come from, name -> value): eval/summary.json, eval/compare.json, or the last
    validation scores."""
    summary = output_dir / "eval" / "summary.json"
    compare = output_dir / "eval" / "compare.json"
    try:
        if summary.is_file():
            data = json.loads(summary.read_text())
            flat = {k: v for k, v in _flatten(data).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            return "eval/summary.json", flat
        if compare.is_file():
            data = json.loads(compare.read_text())
            la, lb = data["a"]["label"], data["b"]["label"]
            out: dict[str, Any] = {}
            for metric, e in data.get("metrics", {}).items():
                out[f"{metric}: {la} mean"] = e["a"]["mean"]
                out[f"{metric}: {lb} mean"] = e["b"]["mean"]
                out[f"{metric}: win rate of {la}"] = e["win_rate"]["win_rate"]
            return "eval/compare.json", out
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{summary if summary.is_file() else compare}: cannot read the evaluation numbers "
                        f"({type(exc).__name__}: {exc}); fix or remove the file") from exc
    return ("the last validation round", dict(last_scores)) if last_scores else ("", {})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else f"`{v}`" if isinstance(v, (list, dict)) else str(v)


def card_text(cfg: TrainConfig, output_dir: Path, *, step: int, num_processes: int, network_name: str,
              network_class: str, validation: dict[str, Any] | None = None, finished: bool = True) -> str:
    """The model card's markdown (with its YAML metadata block)."""
    from huggingface_hub import ModelCardData

    base = cfg.pretrained_model_name_or_path
    repo = cfg.hub_model_id if cfg.push_to_hub and cfg.hub_model_id else str(output_dir)
    tags = ["diffusion-po", "diffusers", "text-to-image", f"diffusion-po-{cfg.method}",
            "lora" if cfg.use_lora else "full-fine-tune"]
    data = ModelCardData(library_name="diffusers", tags=tags, base_model=base if _is_hub_id(base) else None,
                         license=None, pipeline_tag="text-to-image")
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {Path(repo).name}: {cfg.method} on {Path(base).name or base}", ""]
    what = f"a LoRA (rank {cfg.rank}, alpha {cfg.lora_alpha or cfg.rank})" if cfg.use_lora else f"the full {network_name}"
    state = f"after {step} of {cfg.max_train_steps} steps" if not finished else f"{step} steps"
    lines += [f"Preference-tuned with [diffusion-po](https://github.com/diffusion-po/diffusion-po), method "
              f"`{cfg.method}`, {what} of `{base}`, {state}.", ""]

    d = cfg.data
    source = d.dataset_name or ", ".join(Path(f).name for f in d.data_files) or "(none)"
    effective = cfg.train_batch_size * cfg.gradient_accumulation_steps * num_processes
    settings: list[tuple[str, Any]] = [
        ("base model", base), ("method", cfg.method), *((f"method_options.{k}", v) for k, v in cfg.method_options.items()),
        ("data", f"{source} (format {d.format}{', streaming' if d.streaming else ''})"),
        ("steps", state), ("learning_rate", cfg.learning_rate), ("scale_lr", cfg.scale_lr),
        ("lr_scheduler", f"{cfg.lr_scheduler}, {cfg.lr_warmup_steps} warm-up steps"),
        ("batch", f"{cfg.train_batch_size} per device x {cfg.gradient_accumulation_steps} accumulation x "
                  f"{num_processes} process(es) = {effective}"),
        ("resolution", cfg.resolution), ("mixed_precision", cfg.mixed_precision), ("seed", cfg.seed),
    ]
    if cfg.use_lora:
        settings += [("LoRA rank / alpha", f"{cfg.rank} / {cfg.lora_alpha or cfg.rank}"),
                     ("LoRA target modules", ", ".join(cfg.lora_target_modules))]
    if cfg.use_ema:
        settings.append(("EMA decay", cfg.ema_decay))
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in settings]
    lines += ["", "The full configuration is in `config.yaml`.", ""]

    if validation:
        g = cfg.validation_guidance
        how = f"{g.name} guidance" + (f", scale {g.scale:g}" if g.scale is not None else "")
        how += f", {g.steps} steps" if g.steps else ""
        lines += ["## Validation images", "",
                  f"{len(validation['prompts'])} prompt(s) x {cfg.num_validation_images} seed(s) "
                  f"({cfg.validation_seed}, ...), {how}; rows are prompts, the seeds are the same in every grid.", ""]
        if validation.get("base"):
            lines += ["Base model (step 0):", "", f"![base model]({validation['base']})", ""]
        if validation.get("latest"):
            lines += [f"Trained (step {validation['latest_step']}):", "", f"![trained]({validation['latest']})", ""]
        lines += ["Prompts: " + "; ".join(f"`{p}`" for p in validation["prompts"]), ""]

    where, numbers = _eval_numbers(output_dir, validation.get("scores", {}) if validation else {})
    if numbers:
        lines += ["## Evaluation", "", f"From {where}:", ""]
        if where == "the last validation round" and validation and validation.get("random_scorer"):
            lines += [f"**The scorer has random test weights: {cfg.validation_scorer} scores mean nothing here.**", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in numbers.items()]
        lines.append("")

    full_network = not cfg.use_lora and not cfg.save_full_pipeline
    imports = f"DiffusionPipeline, {network_class}" if full_network else "DiffusionPipeline"
    lines += ["## Use", "", "```python", "import torch", f"from diffusers import {imports}", ""]
    if cfg.use_lora:
        lines += [f'pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
                  f'pipe.load_lora_weights("{repo}")']
    elif cfg.save_full_pipeline:
        lines += [f'pipe = DiffusionPipeline.from_pretrained("{repo}", torch_dtype=torch.float16).to("cuda")']
    else:
        lines += [f'{network_name} = {network_class}.from_pretrained("{repo}", subfolder="{network_name}", '
                  "torch_dtype=torch.float16)",
                  f'pipe = DiffusionPipeline.from_pretrained("{base}", {network_name}={network_name}, '
                  'torch_dtype=torch.float16).to("cuda")']
    example = validation["prompts"][0] if validation and validation["prompts"] else "a photo of a cat"
    lines += [f"image = pipe({json.dumps(example)}).images[0]", "```", ""]
    if cfg.method == "npo":
        flag = "--npo-lora" if cfg.use_lora else "--negative-model"
        lines += ["These are negative-preference (NPO) weights: use them as the negative model of NPO guidance, "
                  f"`diffusion-po sample --model {base} {flag} {repo} --guidance npo`, not as a model to sample from.", ""]
    return "\n".join(lines)


def write_model_card(output_dir: Path, text: str) -> Path:
    """Write `output_dir/README.md` whole (a temporary file renamed into place)."""
    from huggingface_hub import ModelCard

    path = output_dir / CARD_FILE
    tmp = path.with_name(path.name + ".tmp")
    ModelCard(text).save(tmp)
    os.replace(tmp, path)
    return path


def write_for_run(trainer: Trainer, validation: Validation | None = None, finished: bool = True) -> Path | None:
    """Write the run's card now (main process only): at each validation round and at the end."""
    if not trainer.accelerator.is_main_process:
        return None
    text = card_text(trainer.cfg, trainer.output_dir, step=trainer.state.step,
                     num_processes=trainer.accelerator.num_processes, network_name=trainer.family.network_name,
                     network_class=type(trainer.unwrapped).__name__,
                     validation=validation.card_info() if validation is not None else None, finished=finished)
    return write_model_card(trainer.output_dir, text)


def push_to_hub(output_dir: Path, repo_id: str | None) -> str:
    """Upload `output_dir` (without checkpoints and hidden run files) to the hub model repo `repo_id`
    (default: the folder's name under the token's account). Returns the repo id. Offline, without a token or
    on a hub error: a UserError saying that everything is saved locally and how to upload it later."""
    from diffusion_po.hub import hub_offline

    target = repo_id or output_dir.name
    later = (f"everything is saved in {output_dir}; upload it later with `hf upload {target} {output_dir} "
             f"--exclude 'checkpoint-*'`")
    if hub_offline():
        raise UserError(f"push_to_hub: this machine is offline (HF_HUB_OFFLINE is set); {later}")
    from huggingface_hub import create_repo, get_token, upload_folder

    if get_token() is None:
        raise UserError(f"push_to_hub: no Hugging Face token (run `hf auth login` or set HF_TOKEN); {later}")
    try:
        repo = create_repo(target, exist_ok=True, repo_type="model").repo_id
        upload_folder(repo_id=repo, folder_path=str(output_dir), commit_message="End of training",
                      ignore_patterns=UPLOAD_IGNORE)
    except Exception as exc:  # network, permission, name errors of the hub: one line, nothing lost
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"push_to_hub to '{target}' failed ({type(exc).__name__}: {first}); {later}") from exc
    return repo


def push_warning(cfg: TrainConfig) -> str | None:
    """At the start: why `push_to_hub` will fail at the end (offline, no token), or None."""
    if not cfg.push_to_hub:
        return None
    from diffusion_po.hub import hub_offline

    if hub_offline():
        return "push_to_hub is on but this machine is offline (HF_HUB_OFFLINE): the upload will fail at the end"
    from huggingface_hub import get_token

    if get_token() is None:
        return "push_to_hub is on but there is no Hugging Face token (hf auth login): the upload will fail at the end"
    return None


__all__ = ["CARD_FILE", "card_text", "push_to_hub", "push_warning", "write_for_run", "write_model_card"]
