"""The toy oracle as an `eval score` metric: generate -> score -> compare -> report on the toy world, offline;
scores from random test weights are marked in scores_meta.json and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffusion_po.cli import main
from diffusion_po.errors import DataError
from diffusion_po.eval.scorers import build_scorer
from diffusion_po.toy import oracle
from diffusion_po.toy.build import ensure_base

GEN = ["--n", "1", "--steps", "3", "--guidance-scale", "4", "--scheduler", "DPMSolverMultistepScheduler",
       "--gen-batch-size", "3"]


@pytest.fixture(scope="module")
def toy_prompts(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("toy_prompts") / "prompts.txt"
    assert main(["toy", "prompts", "--world", "simple", "--out", str(path), "--n", "3"]) == 0
    assert len(path.read_text().splitlines()) == 3
    return str(path)


def _manifest(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]


def test_eval_flow_on_the_toy_world_scored_by_the_oracle(toy_prompts, tmp_path, capsys):
    base = str(ensure_base(world_name="simple"))
    runs = {"cfg4": [], "cfg1": ["--guidance-scale", "1"]}
    for name, extra in runs.items():
        argv = ["eval", "generate", "--model", base, "--prompts", toy_prompts, *GEN, *extra, "--out", str(tmp_path / name)]
        assert main(argv) == 0
        assert main(["eval", "score", "--images", str(tmp_path / name), "--metrics", "toy", "--num-workers", "0"]) == 0
    # the stored scores are the oracle's own on the saved images
    table = [json.loads(x) for x in (tmp_path / "cfg4" / "scores.jsonl").read_text().splitlines()]
    by_image = {r["image"]: r for r in table}
    for row in _manifest(tmp_path / "cfg4"):
        expected = oracle.score(Image.open(tmp_path / "cfg4" / row["image"]), row["prompt"])
        assert by_image[row["image"]]["toy_reward"] == pytest.approx(expected.reward, abs=1e-6)  # stored as float32
        assert by_image[row["image"]]["toy_shape_ok"] == pytest.approx(expected.shape_ok, abs=1e-6)
    meta = json.loads((tmp_path / "cfg4" / "scores_meta.json").read_text())
    assert meta["scorers"]["toy"]["primary"] == "toy_reward"
    assert meta["scorers"]["toy"]["random_weights"] is False
    assert meta["random_weights"]["any"] is False  # the toy base is a trained model
    assert main(["eval", "compare", "--a", str(tmp_path / "cfg4"), "--b", str(tmp_path / "cfg1"),
                 "--n-boot", "50", "--out", str(tmp_path / "cmp")]) == 0
    assert "toy_reward" in capsys.readouterr().out
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| toy_reward |" in report and "random test weights" not in report


def test_scores_from_random_test_weights_are_marked(toy_prompts, tiny_model_factory, tmp_path):
    random_model = tiny_model_factory("sd")  # a tiny random-initialised pipeline (diffusion_po.tiny)
    base = str(ensure_base(world_name="simple"))
    for name, model in (("random", random_model), ("toy", base)):
        argv = ["eval", "generate", "--model", model, "--prompts", toy_prompts, *GEN, "--out", str(tmp_path / name)]
        assert main(argv) == 0
        assert main(["eval", "score", "--images", str(tmp_path / name), "--metrics", "toy", "--num-workers", "0"]) == 0
    meta = json.loads((tmp_path / "random" / "scores_meta.json").read_text())
    assert meta["random_weights"]["any"] is True
    assert meta["random_weights"]["models"] == [random_model]
    assert "random test weights" in meta["random_weights"]["note"]
    assert json.loads((tmp_path / "toy" / "scores_meta.json").read_text())["random_weights"]["any"] is False
    assert main(["eval", "compare", "--a", str(tmp_path / "toy"), "--b", str(tmp_path / "random"),
                 "--n-boot", "20", "--out", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "random: scores from random test weights" in report and "toy: scores" not in report


def test_random_test_scorers_are_marked(tmp_path):
    from diffusion_po.eval.testing import save_tiny_clip

    scorer = build_scorer("clip", checkpoint=str(save_tiny_clip(tmp_path / "clip")))
    assert scorer.info()["random_weights"] is True
    assert build_scorer("toy").info()["random_weights"] is False


def test_toy_metric_rejects_captions_outside_the_toy_world():
    scorer = build_scorer("toy")
    image = Image.new("RGB", (32, 32), (200, 200, 200))
    with pytest.raises(DataError, match="metric toy: not a toy-world caption: 'a photo of a cat'"):
        scorer.score([image], ["a photo of a cat"])


def test_eval_does_not_import_the_toy_package():
    code = ("import sys, diffusion_po.commands.eval, diffusion_po.eval.scorers, diffusion_po.eval.scoring; "
            "from diffusion_po.eval.scorers import parse_metric_list; assert parse_metric_list('toy') == ['toy']; "
            "print([m for m in sys.modules if m.startswith('diffusion_po.toy')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
