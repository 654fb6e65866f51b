"""The configs shipped with the package (`diffusion_po/configs/`, also `configs/` in a clone).

`config_path("sd15_dpo")` finds a shipped recipe by name; a path that exists is returned as it is.
"""

from __future__ import annotations

from pathlib import Path

from diffusion_po.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def config_names() -> list[str]:
    """Names of the shipped training recipes (file stems of `diffusion_po/configs/*.yaml`)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A config file: an existing path as given, else the shipped recipe of that name (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    shipped = CONFIGS_DIR / f"{stem}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config file not found: {name_or_path} (shipped recipes: {', '.join(config_names())})")
