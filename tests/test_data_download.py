"""`diffusion-po data download`: pickapic_v2_no_images rows (image URLs) fetched once from a local HTTP server
into a folder that trains as `pickapic`; resumable; clear errors offline; `data_files: [folder]`."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffusion_po.cli import main
from diffusion_po.config import DataConfig
from diffusion_po.data import build_train_data
from diffusion_po.data.download import FAILURES_LOG, download_pickapic_images
from diffusion_po.data.preference import load_rows
from diffusion_po.errors import DataError
from tests.helpers import RGB, pickapic_rows

N = 6


@pytest.fixture
def server():
    """A local image host: path -> bytes, 404 otherwise; records every request path."""
    files: dict[str, bytes] = {}
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            requests.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"not found")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", files, requests
    httpd.shutdown()
    httpd.server_close()


def _no_images_file(path: Path, base_url: str, files: dict[str, bytes], missing_row: int | None = None) -> Path:
    """The pickapic_v2_no_images layout: the rows of tests.helpers with URLs instead of jpg_0/jpg_1."""
    rows = pickapic_rows(N)
    table: dict[str, list] = {"caption": rows["caption"], "label_0": rows["label_0"], "label_1": rows["label_1"]}
    for k in (0, 1):
        table[f"image_{k}_uid"] = [f"uid-{i}-{k}" for i in range(N)]
        table[f"image_{k}_url"] = []
        for i in range(N):
            url_path = f"/images/{i}_{k}.jpeg"
            if i == missing_row and k == 1:
                url_path = "/images/gone.jpeg"  # a dead link, as many in Pick-a-Pic
            else:
                files[url_path] = rows[f"jpg_{k}"][i]
            table[f"image_{k}_url"].append(base_url + url_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), path)
    return path


def test_download_once_then_train_on_the_folder(server, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    base_url, files, requests = server
    src = _no_images_file(tmp_path / "no_images" / "train-00000.parquet", base_url, files, missing_row=N - 1)
    out = tmp_path / "pickapic"
    assert main(["data", "download", str(src.parent), "--out", str(out), "--workers", "3"]) == 0
    assert f"{N - 1} of {N} rows written" in capsys.readouterr().out
    assert len(requests) == 2 * N  # every image once (the dead link too)
    written = pq.read_table(out / "train-00000.parquet").to_pylist()
    assert [r["jpg_0"] for r in written] == [f"images/uid-{i}-0.jpg" for i in range(N - 1)]
    assert (out / "images" / "uid-0-1.jpg").read_bytes() == files["/images/0_1.jpeg"]
    assert "gone.jpeg\tHTTP 404" in (out / FAILURES_LOG).read_text()

    # resumable: a second run fetches only what is still missing (the dead link)
    summary = download_pickapic_images([str(src)], out)
    assert requests[2 * N:] == ["/images/gone.jpeg"]
    assert (summary.downloaded, summary.already_present, summary.rows_written) == (0, 2 * N - 1, N - 1)

    # the folder trains as Pick-a-Pic: winner first (the caption names the winner's colour)
    cfg = DataConfig(format="pickapic", data_files=[str(out)], random_flip=False)
    data = build_train_data(cfg, 16, N - 1, 0, 1, 0)
    batch = next(iter(data.loader))
    assert data.num_rows == N - 1
    for caption, w, lo in zip(batch["captions"], batch["pixels_w"], batch["pixels_l"]):
        target = (torch.tensor(RGB[caption.split()[1]]) / 127.5 - 1).view(3, 1, 1)
        assert (w - target).abs().mean() < (lo - target).abs().mean()


def test_offline_fails_at_once_naming_the_first_url(server, tmp_path, monkeypatch):
    base_url, files, requests = server
    src = _no_images_file(tmp_path / "src.parquet", base_url, files)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=rf"cannot download {base_url}/images/0_0.jpeg .*OFFLINE is set"):
        download_pickapic_images([str(src)], tmp_path / "out")
    assert requests == []  # nothing was tried
    assert main(["data", "download", str(src), "--out", str(tmp_path / "out")]) == 2


def test_complete_folder_needs_no_network(server, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    base_url, files, requests = server
    src = _no_images_file(tmp_path / "src.parquet", base_url, files)
    download_pickapic_images([str(src)], tmp_path / "out")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert download_pickapic_images([str(src)], tmp_path / "out").rows_written == N


def test_unreachable_host_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    src = _no_images_file(tmp_path / "src.parquet", "http://127.0.0.1:9", {})  # discard port: refused
    with pytest.raises(DataError, match=r"cannot download http://127.0.0.1:9/images/0_0.jpeg .*seems offline"):
        download_pickapic_images([str(src)], tmp_path / "out", timeout=5)


def test_no_images_rows_given_to_training_point_to_the_download(server, tmp_path):
    base_url, files, _ = server
    src = _no_images_file(tmp_path / "src.parquet", base_url, files)
    with pytest.raises(DataError, match="pickapic_v2_no_images layout.*diffusion-po data download"):
        load_rows(DataConfig(format="pickapic", data_files=[str(src)]))


def test_data_files_folder_reads_its_files(tmp_path):
    folder = tmp_path / "pairs"
    (folder / "part").mkdir(parents=True)
    (folder / ".cache").mkdir()
    for name, rows in (("a.jsonl", 2), ("part/b.jsonl", 3), (".cache/hidden.jsonl", 5)):
        (folder / name).write_text("".join(json.dumps({"caption": f"p{i}"}) + "\n" for i in range(rows)))
    (folder / "notes.txt").write_text("not data\n")
    rows, _ = load_rows(DataConfig(format="prompts", data_files=[str(folder)]))
    assert len(rows) == 5  # a.jsonl + part/b.jsonl; hidden folders and other kinds skipped
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data folder .*empty has no .parquet"):
        load_rows(DataConfig(format="prompts", data_files=[str(tmp_path / "empty")]))
