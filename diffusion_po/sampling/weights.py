r"""Weighted prompts written as text: one rule for `diffusion-po sample`, prompt files and the Python API.

`"TEXT:NUMBER"` is TEXT at weight NUMBER when the colon is the last one, TEXT is not empty, the
character before the colon is not a digit, and NUMBER is a plain decimal number (`1.5`, `-2`, `.5`,
`1e-1`). Everything else is text at weight 1: `"aspect ratio 16:9"`, `"12:30"` (digit before the colon),
`"style: watercolor"` (not a number). `\:` is a literal colon anywhere (`"mood\:2"` is the text
"mood:2" at weight 1); to weight a text that ends in a digit, put a space before the colon:
`"aspect ratio 16:9 :0.5"`. A weight must be finite: `nan`/`inf` are refused.
"""

from __future__ import annotations

import math
import re

from diffusion_po.errors import UserError

_WEIGHT = re.compile(r"^(?P<text>.*[^\d\\]):\s*(?P<w>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$", re.S)
_NON_FINITE = re.compile(r"(?<!\\):\s*[-+]?(?:nan|inf|infinity)\s*$", re.I)


def checked_weight(weight: float | str, text: str) -> float:
    """`weight` as a finite float, or a UserError naming the prompt."""
    try:
        value = float(weight)
    except (TypeError, ValueError) as exc:
        raise UserError(f"prompt '{text}': weight {weight!r} is not a number") from exc
    if not math.isfinite(value):
        raise UserError(f"prompt '{text}': weight {weight!r} must be a finite number")
    return value


def parse_weighted(text: str) -> tuple[str, float]:
    r""""red:1.5" -> ("red", 1.5); "red" -> ("red", 1.0); "aspect ratio 16:9" -> (same, 1.0);
    "mood\:2" -> ("mood:2", 1.0); "16:9 :2" -> ("16:9", 2.0). See the module docstring for the rule."""
    if _NON_FINITE.search(text):
        raise UserError(f"prompt '{text}': the weight must be a finite number (not nan/inf)")
    match = _WEIGHT.match(text)
    if match and match["text"].strip():
        head, weight = match["text"], checked_weight(match["w"], text)
    else:
        head, weight = text, 1.0
    return head.replace("\\:", ":").strip(), weight
