"""`diffusion-po data download`: Pick-a-Pic's `pickapic_v2_no_images` layout made trainable.

`yuvalkirstain/pickapic_v2_no_images` has the rows of Pick-a-Pic v2 with image URLs (`image_0_url`,
`image_1_url`, plus `image_0_uid`/`image_1_uid`) instead of the JPEG bytes `jpg_0`/`jpg_1`. This step
downloads every image once into a folder and writes the rows in the `pickapic` format:

    diffusion-po data download 'pickapic_v2_no_images/data/train-*.parquet' --out data/pickapic_v2 --workers 16
    diffusion-po train sd15_dpo --set 'data.data_files=[data/pickapic_v2]'

- `<out>/images/<uid>.jpg`: each image, written atomically; files already there are not fetched again, so
  an interrupted download continues where it stopped (run the same command again);
- `<out>/<input name>.parquet`: the input's columns plus `jpg_0`/`jpg_1` (paths relative to `<out>`), for
  the rows whose two images are on disk; rows with an image that could not be fetched (HTTP error, not an
  image) are left out and listed in `<out>/download_failures.log`;
- offline (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`, or the first URL unreachable), a `DataError` naming the
  first URL still to fetch, before anything else is tried.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from diffusion_po.errors import DataError
from diffusion_po.hub import hub_offline

URL_COLUMNS = ("image_0_url", "image_1_url")
UID_COLUMNS = ("image_0_uid", "image_1_uid")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
FAILURES_LOG = "download_failures.log"


@dataclass
class DownloadSummary:
    rows_in: int = 0
    rows_written: int = 0
    downloaded: int = 0
    already_present: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _offline() -> bool:
    return hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _image_name(url: str, uid: object) -> str:
    stem = str(uid) if uid not in (None, "") else hashlib.sha1(url.encode()).hexdigest()[:24]
    return f"images/{stem}.jpg"


def _read_rows(path: str) -> list[dict]:
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        table = pq.read_table(path)
    elif suffix in (".jsonl", ".json"):
        table = pj.read_json(path)
    else:
        raise DataError(f"{path}: expected .parquet or .jsonl files of pickapic_v2_no_images")
    missing = [c for c in URL_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: no column(s) {', '.join(missing)} (found {', '.join(table.column_names)}); "
                        "expected the pickapic_v2_no_images layout (image_0_url, image_1_url, label_0, caption)")
    return table.to_pylist()


class _Unreachable(Exception):
    """The network itself failed (DNS, refused, timeout), not one URL."""


def _fetch(url: str, target: Path, timeout: float) -> None:
    """Download `url` to `target` atomically, checking that it is an image."""
    import urllib.error  # here, not at the top: `diffusion-po --help` stays fast
    import urllib.request

    from PIL import Image, UnidentifiedImageError

    request = urllib.request.Request(url, headers={"User-Agent": "diffusion-po data download"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read()
    except urllib.error.HTTPError as exc:
        raise ValueError(f"HTTP {exc.code}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        raise _Unreachable(str(getattr(exc, "reason", exc))) from exc
    try:
        Image.open(io.BytesIO(data)).verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not an image ({len(data)} bytes)") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def download_pickapic_images(
    sources: list[str], out: str | Path, workers: int = 8, timeout: float = 30.0, limit: int | None = None
) -> DownloadSummary:
    """Download the images of pickapic_v2_no_images rows once and write `pickapic`-format parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffusion_po.data.preference import _expand_files

    out = Path(out)
    files = _expand_files(sources)
    tables = [(f, _read_rows(f)[:limit] if limit is not None else _read_rows(f)) for f in files]
    summary = DownloadSummary(rows_in=sum(len(rows) for _, rows in tables))
    jobs: dict[str, str] = {}  # relative image path -> url
    for _, rows in tables:
        for row in rows:
            for url_col, uid_col in zip(URL_COLUMNS, UID_COLUMNS):
                if row.get(url_col):
                    jobs.setdefault(_image_name(row[url_col], row.get(uid_col)), row[url_col])
    todo = [(name, url) for name, url in jobs.items() if not (out / name).is_file()]
    summary.already_present = len(jobs) - len(todo)
    if todo and _offline():
        raise DataError(f"cannot download {todo[0][1]} (and {len(todo) - 1} more images missing from {out}/images): "
                        "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set; run `diffusion-po data download` on a machine "
                        f"with network access and copy {out} here")
    failed: dict[str, str] = {}

    def one(job: tuple[str, str]) -> None:
        name, url = job
        try:
            _fetch(url, out / name, timeout)
        except (ValueError, _Unreachable) as exc:
            failed[name] = f"{url}\t{exc}"

    if todo:  # the first URL alone: if the network is down, say so once, naming it
        try:
            _fetch(todo[0][1], out / todo[0][0], timeout)
        except _Unreachable as exc:
            raise DataError(f"cannot download {todo[0][1]} ({exc}): this machine seems offline or the host is "
                            f"down; run `diffusion-po data download` where the URLs are reachable and copy {out}") from exc
        except ValueError as exc:
            failed[todo[0][0]] = f"{todo[0][1]}\t{exc}"
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(one, todo[1:]))
    summary.downloaded = len(todo) - len(failed)
    summary.failed = sorted((v.split("\t")[0], v.split("\t", 1)[1]) for v in failed.values())

    out.mkdir(parents=True, exist_ok=True)
    for path, rows in tables:
        kept = []
        for row in rows:
            names = [_image_name(row[u], row.get(i)) if row.get(u) else None for u, i in zip(URL_COLUMNS, UID_COLUMNS)]
            if all(n is not None and (out / n).is_file() for n in names):
                kept.append({**row, IMAGE_COLUMNS[0]: names[0], IMAGE_COLUMNS[1]: names[1]})
        target = out / (Path(path).stem + ".parquet")
        if kept:
            tmp = target.with_name(target.name + ".part")
            pq.write_table(pa.Table.from_pylist(kept), tmp)
            os.replace(tmp, target)
            summary.outputs.append(str(target))
        summary.rows_written += len(kept)
    log = out / FAILURES_LOG
    if summary.failed:
        log.write_text("".join(f"{url}\t{why}\n" for url, why in summary.failed))
    elif log.exists():
        log.unlink()
    return summary


def register_download(verbs: argparse._SubParsersAction) -> None:
    """Add `diffusion-po data download` to the `data` verb."""
    p = verbs.add_parser(
        "download", help="fetch the images of pickapic_v2_no_images rows once (resumable) into a trainable folder",
        description="Download the images of Pick-a-Pic rows that carry URLs (image_0_url/image_1_url) into "
                    "OUT/images and write OUT/*.parquet in the pickapic format; train with data.data_files: [OUT]. "
                    "Run again to resume.",
    )
    p.add_argument("sources", nargs="+", help="parquet/jsonl files, globs or folders of pickapic_v2_no_images")
    p.add_argument("--out", required=True, help="output folder (images/ and the parquet files)")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of each file (a quick try)")
    p.set_defaults(func=run_download)


def run_download(args: argparse.Namespace) -> int:
    from diffusion_po.errors import UserError

    if args.workers <= 0 or args.timeout <= 0 or (args.limit is not None and args.limit <= 0):
        raise UserError("--workers, --timeout and --limit must be positive")
    s = download_pickapic_images(args.sources, args.out, args.workers, args.timeout, args.limit)
    print(f"{s.rows_written} of {s.rows_in} rows written to {', '.join(s.outputs) or '(none)'}; images: "
          f"{s.downloaded} downloaded, {s.already_present} already there, {len(s.failed)} failed"
          + (f" (see {Path(args.out) / FAILURES_LOG})" if s.failed else ""))
    print(f"train with: --set 'data.data_files=[{args.out}]'")
    return 0
