"""Config loading: typed validation, overrides, errors that name the key and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffusion_po.config import DataConfig, TrainConfig, apply_overrides, load_train_config
from diffusion_po.errors import ConfigError


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_loads_typed_values_and_sections(tmp_path):
    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "learning_rate": 1, "data": {"streaming": True}})
    cfg = load_train_config(path)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.data, DataConfig)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.data.streaming is True


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "learning_rat": 1e-5})
    with pytest.raises(ConfigError) as exc:
        load_train_config(path)
    msg = str(exc.value)
    assert "learning_rat" in msg and str(path) in msg and "learning_rate" in msg


def test_unknown_nested_key_and_wrong_type(tmp_path):
    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "data": {"fromat": "pairs"}})
    with pytest.raises(ConfigError, match=r"data\.fromat"):
        load_train_config(path)
    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "train_batch_size": "eight"})
    with pytest.raises(ConfigError, match="train_batch_size.*integer"):
        load_train_config(path)
    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_train_config(path)


def test_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path, {"pretrained_model_name_or_path": "m"})
    cfg = load_train_config(path, ["learning_rate=1e-5", "data.strict=true", "use_lora=true",
                                   "lora_target_modules=[to_q, to_v]"])
    assert cfg.learning_rate == 1e-5 and cfg.data.strict and cfg.use_lora
    assert cfg.lora_target_modules == ["to_q", "to_v"]
    with pytest.raises(ConfigError, match="overrides"):
        load_train_config(path, ["beta_dpo=abc"])


def test_cross_key_validation_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path"):
        load_train_config(write(tmp_path, {}))
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_train_config(write(tmp_path, {"pretrained_model_name_or_path": "m", "label_smoothing": 0.7}))
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "nope.yaml")


def test_apply_overrides_does_not_mutate_input():
    data = {"data": {"split": "train"}}
    out = apply_overrides(data, ["data.split=validation"])
    assert data["data"]["split"] == "train" and out["data"]["split"] == "validation"


@pytest.mark.parametrize("name", ["sd15_dpo.yaml", "sd15_dpo_lora.yaml", "sdxl_dpo_lora.yaml", "sd3_dpo_lora.yaml"])
def test_shipped_configs_validate(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = load_train_config(path)
    assert cfg.method == "dpo"


RECIPES = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if not p.name.startswith("toy_"))


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_keep_the_fast_path(name):
    """No GPU recipe turns a speed switch off (each one's default is the fast path on CUDA; docs/performance.md)."""
    path = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = load_train_config(path)
    fast = {"compile": "auto", "channels_last": None, "fused_optimizer": None, "reference_inference_mode": True,
            "prefetch_to_device": True, "dataloader_num_workers": None, "async_checkpointing": None,
            "frozen_weights_in_weight_dtype": True, "encoders_on_device": None, "allow_tf32": True,
            "enable_xformers_memory_efficient_attention": False}
    assert {k: getattr(cfg, k) for k in fast} == fast


# --- method settings: each lives in its method's Options; top-level spellings are aliases


def test_top_level_method_settings_are_aliases_of_method_options(tmp_path):
    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "beta_dpo": 500, "sft_weight": 0.5})
    cfg = load_train_config(path)
    assert not hasattr(cfg, "beta_dpo")
    assert cfg.method_options == {"beta_dpo": 500.0, "sft_weight": 0.5, "label_smoothing": 0.0}
    # --set with either spelling; a top-level override replaces the file's method_options value
    cfg = load_train_config(path, ["beta_dpo=50", "method_options.label_smoothing=0.1"])
    assert cfg.method_options == {"beta_dpo": 50.0, "sft_weight": 0.5, "label_smoothing": 0.1}
    nested = write(tmp_path, {"pretrained_model_name_or_path": "m", "method": "npo",
                              "method_options": {"beta_dpo": 1000}}, "nested.yaml")
    assert load_train_config(nested).method_options == {"beta_dpo": 1000.0}
    assert load_train_config(nested, ["beta_dpo=2000"]).method_options == {"beta_dpo": 2000.0}


@pytest.mark.parametrize("method,key,value,options", [
    ("kto", "sft_weight", 2, "beta, lambda_d, lambda_u"),
    ("mapo", "beta_dpo", 10, "beta_mapo, snr_value"),
    ("npo", "label_smoothing", 0.2, "beta_dpo"),
    ("sft", "beta_dpo", 10, "none"),
])
def test_a_key_the_method_does_not_read_is_an_error(tmp_path, method, key, value, options):
    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "method": method, key: value})
    with pytest.raises(ConfigError) as exc:
        load_train_config(path)
    assert str(exc.value).startswith(f"{path}: key '{key}' is not read by method '{method}' (its options: {options})")
    with pytest.raises(ConfigError, match=f"key '{key}' is not read by method '{method}'"):
        load_train_config(write(tmp_path, {"pretrained_model_name_or_path": "m", "method": method}),
                          [f"method_options.{key}={value}"])


def test_method_option_typo_suggests_the_key(tmp_path):
    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "method": "kto", "method_options": {"lamda_d": 2}})
    with pytest.raises(ConfigError, match=r"'lamda_d' is not read by method 'kto'.*did you mean 'lambda_d'"):
        load_train_config(path)


def test_method_setting_given_twice_is_an_error(tmp_path):
    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "beta_dpo": 500,
                            "method_options": {"beta_dpo": 5000}})
    with pytest.raises(ConfigError, match=r"'beta_dpo' is set twice, 500 at the top level and 5000 under method_options"):
        load_train_config(path)
    same = write(tmp_path, {"pretrained_model_name_or_path": "m", "beta_dpo": 500,
                            "method_options": {"beta_dpo": 500}}, "same.yaml")
    assert load_train_config(same).method_options["beta_dpo"] == 500.0


@pytest.mark.parametrize("method,override,match", [
    ("dpo", "beta_dpo=0", r"method_options\.beta_dpo must be positive, got 0\.0"),
    ("dpo", "sft_weight=-1", r"method_options\.sft_weight must be >= 0"),
    ("robust_dpo", "label_smoothing=0.5", r"method_options\.label_smoothing must be in \(0, 0\.5\) for method robust_dpo"),
    ("dpo_sft", "beta_dpo=100", r"method_options\.sft_weight must be > 0 for method dpo_sft"),
    ("dro", "method_options.buffer_size=0", r"method_options\.buffer_size must be positive"),
    ("self_npo", "method_options.ema_decay=2", r"method_options\.ema_decay must be in \[0, 1\]"),
    ("kto", "method_options.beta=big", r"method_options\.beta.*must be a number"),
])
def test_method_option_values_are_checked_at_load_time(tmp_path, method, override, match):
    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "method": method})
    with pytest.raises(ConfigError, match=match) as exc:
        load_train_config(path, [override])
    assert str(exc.value).startswith(str(path))


def test_unknown_method_names_the_file(tmp_path):
    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "method": "dpoo"})
    with pytest.raises(ConfigError, match=r"cfg\.yaml.*unknown method 'dpoo'; available: .*dcpo.*module:Class"):
        load_train_config(path)


@pytest.mark.parametrize("name", ["sd15_dpo", "sd15_npo_lora", "sd15_kto", "sdxl_dro", "sdxl_self_npo", "toy_dcpo"])
def test_saved_run_config_round_trips(tmp_path, name):
    from pathlib import Path

    from diffusion_po.config import save_config, to_dict

    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml",
                            ["pretrained_model_name_or_path=m"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_train_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert "beta_dpo" not in yaml.safe_load((tmp_path / "config.yaml").read_text())  # under method_options only
def test_lr_scheduler_typo_is_refused_before_any_model_loads(tmp_path):
    """The model path does not exist: only a check in `validate` can name the scheduler typo."""
    path = write(tmp_path, {"pretrained_model_name_or_path": str(tmp_path / "no_model"), "lr_scheduler": "cosin"})
    with pytest.raises(ConfigError) as exc:
        load_train_config(path)
    msg = str(exc.value)
    assert "lr_scheduler" in msg and "'cosine'" in msg and str(path) in msg and "\n" not in msg
    assert load_train_config(path, ["lr_scheduler=cosine_with_restarts"]).lr_scheduler == "cosine_with_restarts"


def test_mixed_precision_no_from_yaml_and_set(tmp_path):
    """YAML 1.1 reads a bare `no` as false; `mixed_precision: no` and `--set mixed_precision=no` mean fp32."""
    path = tmp_path / "cfg.yaml"
    path.write_text("pretrained_model_name_or_path: m\nmixed_precision: no\n")
    assert load_train_config(path).mixed_precision == "no"
    assert load_train_config(path, ["mixed_precision=bf16"]).mixed_precision == "bf16"
    assert load_train_config(path, ["mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ConfigError, match="use_lora.*true or false"):  # plain booleans are still checked
        load_train_config(path, ["use_lora=maybe"])


def test_total_batch_size_sets_the_accumulation_from_the_process_count(tmp_path):
    from diffusion_po.config import resolve_total_batch

    path = write(tmp_path, {"pretrained_model_name_or_path": "m", "train_batch_size": 2, "total_batch_size": 64})
    cfg = load_train_config(path)
    assert [resolve_total_batch(cfg, n).gradient_accumulation_steps for n in (1, 2, 4, 32)] == [32, 16, 8, 1]
    with pytest.raises(ConfigError, match=r"not a multiple.*2 x 3 process\(es\) = 6"):
        resolve_total_batch(cfg, 3)
    with pytest.raises(ConfigError, match="not a multiple"):
        resolve_total_batch(cfg, 64)  # fewer pairs than one micro-step of all processes
    clash = load_train_config(path, ["gradient_accumulation_steps=4"])
    with pytest.raises(ConfigError, match="drop gradient_accumulation_steps: 4"):
        resolve_total_batch(clash, 1)
    assert resolve_total_batch(clash, 8).gradient_accumulation_steps == 4  # agrees: accepted
    plain = load_train_config(path, ["total_batch_size=null", "gradient_accumulation_steps=3"])
    assert resolve_total_batch(plain, 4).gradient_accumulation_steps == 3
    with pytest.raises(ConfigError, match="total_batch_size.*positive"):
        load_train_config(path, ["total_batch_size=0"])
