"""Preference data loading: formats, ties, label order, joint augmentation, bad rows, streaming."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_po.config import DataConfig
from diffusion_po.data import build_train_data
from diffusion_po.data.preference import PairTransform, RowDecoder
from diffusion_po.errors import DataError
from tests.helpers import RGB, write_pickapic


def first_batch(cfg: DataConfig, per_device=4, rank=0, world=1, seed=0, start=0):
    data = build_train_data(cfg, 16, per_device, rank, world, seed, start_micro_step=start)
    return next(iter(data.loader)), data


def test_pickapic_winner_first_and_ties_dropped(tmp_path):
    path = write_pickapic(tmp_path / "p.parquet", n=12, ties=4)
    batch, data = first_batch(DataConfig(format="pickapic", data_files=[str(path)]), per_device=8)
    assert data.num_rows == 8 and data.dropped_ties == 4
    # in the synthetic set the caption names the winner's colour; the winner comes first whatever label_0 is
    for caption, w, lo in zip(batch["captions"], batch["pixels_w"], batch["pixels_l"]):
        colour = caption.split()[1]
        target = (torch.tensor(RGB[colour]) / 127.5 - 1).view(3, 1, 1)
        assert (w - target).abs().mean() < (lo - target).abs().mean()
    assert batch["pixels_w"].shape == (8, 3, 16, 16)
    assert batch["pixels_w"].min() >= -1 and batch["pixels_w"].max() <= 1


def test_ties_kept_and_reverse_labels(tmp_path):
    path = write_pickapic(tmp_path / "p.parquet", n=8, ties=8)
    kept = DataConfig(format="pickapic", data_files=[str(path)], drop_ties=False, random_flip=False)
    batch, data = first_batch(kept)
    assert data.num_rows == 8
    rev = DataConfig(format="pickapic", data_files=[str(path)], drop_ties=False, random_flip=False, reverse_labels=True)
    batch_rev, _ = first_batch(rev)
    torch.testing.assert_close(batch["pixels_w"], batch_rev["pixels_l"])


def test_pair_transform_flips_and_crops_both_alike():
    arr = np.zeros((20, 30, 3), dtype=np.uint8)
    arr[:, :5] = 255  # a white band on the left edge
    img = Image.fromarray(arr)
    transform = PairTransform(16, center_crop=False, random_crop=True, random_flip=True)
    flips = 0
    for seed in range(20):
        pixels, original, crop = transform([img, img.copy()], random.Random(seed))
        torch.testing.assert_close(pixels[0], pixels[1])
        assert original == (20, 30)
        flips += int(pixels[0][0, :, -1].mean() > pixels[0][0, :, 0].mean())
    assert 0 < flips < 20  # both orientations occur


def test_pairs_layout_from_jsonl_with_paths(tmp_path):
    rows = []
    for i, (good, bad) in enumerate([("red", "blue"), ("green", "yellow")]):
        for name, colour in (("w", good), ("l", bad)):
            Image.new("RGB", (24, 24), RGB[colour]).save(tmp_path / f"{i}_{name}.png")
        rows.append({"prompt": f"a {good} square", "chosen": f"{i}_w.png", "rejected": f"{i}_l.png"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    batch, _ = first_batch(DataConfig(format="pairs", data_files=[str(tmp_path / "pairs.jsonl")]), per_device=2)
    assert sorted(batch["captions"]) == ["a green square", "a red square"]
    red = batch["captions"].index("a red square")
    assert batch["pixels_w"][red][0].mean() > 0.5 and batch["pixels_l"][red][2].mean() > 0.5


def test_dcpo_captions_follow_the_images(tmp_path):
    path = write_pickapic(tmp_path / "p.parquet", n=8)
    batch, _ = first_batch(DataConfig(format="dcpo", data_files=[str(path)]))
    for cap, cw, cl in zip(batch["captions"], batch["captions_w"], batch["captions_l"]):
        assert cap == cw  # in the synthetic set the prompt names the winner
        assert cw != cl


def test_missing_columns_and_empty_sets(tmp_path):
    path = write_pickapic(tmp_path / "p.parquet", n=4, drop_columns=["caption"])
    with pytest.raises(DataError, match=r"needs column\(s\) caption"):
        first_batch(DataConfig(format="pickapic", data_files=[str(path)]))
    small = write_pickapic(tmp_path / "small.parquet", n=2)
    with pytest.raises(DataError, match="fewer than one global batch"):
        first_batch(DataConfig(format="pickapic", data_files=[str(small)]), per_device=4)
    with pytest.raises(DataError, match="no data given"):
        first_batch(DataConfig(format="pickapic"))


def test_bad_rows_reported_with_ids(tmp_path):
    path = write_pickapic(tmp_path / "p.parquet", n=8, corrupt=[1, 3])
    data = build_train_data(DataConfig(format="pickapic", data_files=[str(path)]), 16, 8, 0, 1, 0)
    batch = next(iter(data.loader))
    assert batch["size"] == 6
    assert sorted(r for r, _ in batch["bad_rows"]) == [1, 3]
    decoder = RowDecoder(DataConfig(format="pickapic"), 16, 0, None)
    bad = decoder({"jpg_0": b"x", "jpg_1": b"x", "label_0": 3.0, "caption": "c"}, 5, 0)
    assert "out of range" in bad.reason
    bad = decoder({"jpg_0": b"x", "jpg_1": b"x", "label_0": 1.0, "caption": ""}, 6, 0)
    assert "missing caption" in bad.reason


def test_order_is_deterministic_sharded_and_resumable(tmp_path):
    path = write_pickapic(tmp_path / "p.parquet", n=16)
    cfg = DataConfig(format="pickapic", data_files=[str(path)])

    def ids(per_device, rank, world, start, count):
        data = build_train_data(cfg, 16, per_device, rank, world, 3, start_micro_step=start)
        it = iter(data.loader)
        return [next(it)["row_ids"] for _ in range(count)]

    whole = ids(4, 0, 1, 0, 6)  # crosses an epoch boundary (4 batches per epoch)
    assert ids(4, 0, 1, 2, 4) == whole[2:]
    halves = zip(ids(2, 0, 2, 0, 6), ids(2, 1, 2, 0, 6))
    assert [a + b for a, b in halves] == whole
    assert sorted(sum(whole[:4], [])) == list(range(16))


def test_streaming_reads_shards(tmp_path):
    write_pickapic(tmp_path / "a.parquet", n=6, seed=1)
    write_pickapic(tmp_path / "b.parquet", n=6, seed=2)
    cfg = DataConfig(format="pickapic", data_files=[str(tmp_path / "*.parquet")], streaming=True,
                     shuffle_buffer_size=4)
    data = build_train_data(cfg, 16, 4, 0, 1, 0)
    it = iter(data.loader)
    batches = [next(it) for _ in range(4)]  # more than one pass over 12 rows
    assert all(b["size"] == 4 for b in batches)
    assert data.num_rows is None


def _one_line_data_error(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as exc:
        first_batch(cfg, per_device=2)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_damaged_and_empty_files_stop_with_their_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = write_pickapic(tmp_path / "good.parquet", n=4)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 but not really a parquet file" * 10)
    zero_rows = tmp_path / "zero.parquet"
    pq.write_table(pa.table({k: pa.array([], pa.string()) for k in ("caption", "jpg_0", "jpg_1")}), zero_rows)
    for bad, words in [(empty, "empty (0 bytes)"), (garbage, "not a readable parquet file"), (zero_rows, "0 rows")]:
        msg = _one_line_data_error(DataConfig(format="pickapic", data_files=[str(good), str(bad)]))
        assert str(bad) in msg and words in msg
    lines = [json.dumps({"prompt": "a red square", "chosen": "w.png", "rejected": "l.png"})] * 3
    lines[1] = '{"prompt": "a red square", "chosen": "w.png"'  # cut short
    broken = tmp_path / "pairs.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    msg = _one_line_data_error(DataConfig(format="pairs", data_files=[str(broken)]))
    assert f"{broken}, line 2: not valid JSON" in msg
    broken.write_text("\n".join([lines[0], "[1, 2]", lines[2]]) + "\n")
    assert "line 2: expected a JSON object" in _one_line_data_error(DataConfig(format="pairs", data_files=[str(broken)]))


def test_bad_rows_name_their_file_and_row(tmp_path):
    a = write_pickapic(tmp_path / "a.parquet", n=4)
    b = write_pickapic(tmp_path / "b.parquet", n=4, seed=1, corrupt=[2])
    data = build_train_data(DataConfig(format="pickapic", data_files=[str(a), str(b)]), 16, 8, 0, 1, 0)
    batch = next(iter(data.loader))
    assert [(row_id, text.split(": ")[0]) for row_id, text in batch["bad_rows"]] == [(6, f"{b} row 2")]
    assert "UnidentifiedImageError" in batch["bad_rows"][0][1]


def test_mixed_size_pair_each_image_resized_and_cropped_on_its_own():
    """The references resize and crop each image of a pair on its own (no squashing of the loser to the winner's
    aspect ratio); SDXL's original size and crop are jpg_0's."""
    wide = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (32, 1, 3)))  # 64 x 32
    tall = Image.fromarray(np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[:, None, None], (1, 24, 3)))  # 24 x 48
    transform = PairTransform(16, center_crop=True, random_flip=False)
    rng = random.Random(0)
    alone = [transform([im], rng)[0][0] for im in (wide, tall)]
    pixels, original, crop = transform([wide, tall], rng)
    torch.testing.assert_close(pixels[0], alone[0])
    torch.testing.assert_close(pixels[1], alone[1])  # not squashed to the wide image's shape
    assert original == (32, 64) and crop == (0, 8)
    pixels, original, crop = transform([wide, tall], rng, size_from=1)
    assert original == (48, 24) and crop == (8, 0)


def test_sdxl_original_size_is_jpg_0s_whichever_image_wins(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(size):
        buf = io.BytesIO()
        Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
        return buf.getvalue()

    rows = {"caption": ["a", "b"], "jpg_0": [png((40, 20)), png((40, 20))], "jpg_1": [png((24, 36)), png((24, 36))],
            "label_0": [1.0, 0.0]}
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table(rows), path)
    batch, _ = first_batch(DataConfig(format="pickapic", data_files=[str(path)], random_flip=False), per_device=2)
    assert batch["original_sizes"].tolist() == [[20, 40], [20, 40]]
