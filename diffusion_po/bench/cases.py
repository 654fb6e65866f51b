"""The bench cases (names and settings), apart from the runner so the CLI lists them without torch."""

from __future__ import annotations

from typing import Any

#: the cases, in the order a GPU run does them (most important first)
CASES: dict[str, dict[str, Any]] = {
    "sd15-dpo-full": {"kind": "train", "model": "sd15", "lora": False, "pairs": {"full": 16, "tiny": 2},
                      "recipe_pairs": {"full": 8, "tiny": 2}, "recipe_encoders": True, "checkpointing": False,
                      "targets": {"speedup_vs_recipe": 2.5, "first_step_s": 90.0, "memory_vs_recipe_same_pairs": 1.0}},
    "sd15-dpo-lora": {"kind": "train", "model": "sd15", "lora": True, "pairs": {"full": 16, "tiny": 2},
                      "recipe_pairs": {"full": 8, "tiny": 2}, "recipe_encoders": True, "checkpointing": False,
                      "targets": {"speedup_vs_recipe": 2.5, "memory_vs_recipe_same_pairs": 1.0}},
    "sd15-sampling": {"kind": "sample", "model": "sd15", "images": {"full": 8, "tiny": 2},
                      "steps": {"full": 50, "tiny": 3},
                      "targets": {"speedup_vs_stock": 1.5, "perp_neg_vs_cfg_step": 1.5}},
    # SDXL: the recipe checkpoints (as measured); ours runs both ways and keeps the one without
    # checkpointing when the device has room for it (`choose_checkpointing`)
    "sdxl-dpo-full": {"kind": "train", "model": "sdxl", "lora": False, "pairs": {"full": 4, "tiny": 2},
                      "recipe_pairs": {"full": 4, "tiny": 2}, "recipe_encoders": False, "checkpointing": True,
                      "choose_checkpointing": True, "targets": {"speedup_vs_recipe": 2.0}},
    "sdxl-dpo-lora": {"kind": "train", "model": "sdxl", "lora": True, "pairs": {"full": 1, "tiny": 1},
                      "recipe_pairs": {"full": 1, "tiny": 1}, "recipe_encoders": False, "checkpointing": True,
                      "choose_checkpointing": True, "targets": {"peak_gib_max": 24.0}},
    "sd15-dro": {"kind": "dro", "model": "sd15", "images": {"full": 8, "tiny": 2}, "targets": {}},
    "sd3-dpo-lora": {"kind": "train", "model": "sd3", "lora": True, "pairs": {"full": 4, "tiny": 2},
                     "recipe_pairs": {"full": 4, "tiny": 2}, "recipe_encoders": False, "checkpointing": False,
                     "targets": {}},
}
