"""blt-data download: every source kind, bad input quarantined, damage reported, resume."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from blt_data.documents import iter_documents, iter_lines
from blt_data.download import DownloadConfig, SourceError, download
from blt_data.registry import Registry
from blt_data.storage import Store
from blt_data.verify import verify

BAD_LINES = [
    b'{"id": "a", "text": "hello"}',
    b"this is not json",
    b"[1, 2, 3]",
    b'{"id": "b"}',
    b'{"id": "c", "text": 42}',
    b'{"id": "d", "text": "\\ud800"}',
    b"   ",
    b'{"id": "a", "text": "same id again"}',
    b'{"text": "no id at all", "lang": "en"}',
    b'{"id": "e", "text": ""}',
]


def registry_at(url: str) -> Registry:
    return Registry(Store.open(url))


def write_source(fs_root: Path, name: str, data: bytes) -> Path:
    path = fs_root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def upload(local: Path, bucket_url: str) -> str:
    """Copy a local source folder or file to the S3 bucket; returns its s3:// URL."""
    store = Store.open(bucket_url)
    dest = f"{bucket_url}/src/{local.name}"
    store.fs.put(str(local), dest.removeprefix("s3://"), recursive=local.is_dir())
    return dest


def quarantined(reg: Registry, m) -> list[dict]:
    return [json.loads(line) for p in m.quarantine for line in iter_lines(reg.store, reg.part_path(m, p))]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_bad_lines_are_quarantined_and_counted(tmp_path, where, request):
    src = write_source(tmp_path / "src", "mixed.jsonl", b"\n".join(BAD_LINES) + b"\n")
    url = str(src)
    store_url = str(tmp_path / "store")
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        url = upload(src, bucket)
        store_url = f"{bucket}/store"
    reg = registry_at(store_url)
    m = download(reg, DownloadConfig(source=url, name="mixed"))

    docs = list(iter_documents(reg, m))
    assert [d["text"] for d in docs] == ["hello", "same id again", "no id at all", ""]
    ids = [d["id"] for d in docs]
    assert ids[0] == "a" and ids[3] == "e"
    assert len(set(ids)) == 4, "ids stay unique: the duplicate got a positional id"
    assert ids[1] == "mixed.jsonl:8" and docs[1]["duplicate_of"] == "a"
    assert ids[2] == "mixed.jsonl:9" and docs[2]["lang"] == "en"

    q = quarantined(reg, m)
    assert [(r["line"], r["reason"].split(" ")[0]) for r in q] == [
        (2, "not"), (3, "not"), (4, "missing"), (5, "field"), (6, "field")
    ]
    assert all(r["source"] == "mixed.jsonl" for r in q)
    assert q[0]["raw"] == "this is not json"
    assert "not valid Unicode" in q[4]["reason"]
    s = m.stats
    # Counts in = documents out + quarantined + blank.
    assert (s.documents, s.quarantined, s.blank_lines, s.duplicate_ids) == (4, 5, 1, 1)
    assert s.documents + s.quarantined + s.blank_lines == len(BAD_LINES)
    assert s.bytes == len("hello".encode()) + len("same id again") + len("no id at all")
    assert verify(reg, m) == []


def test_every_file_format_and_folder_source(tmp_path):
    src = tmp_path / "corpus"
    rows = [{"id": f"r{i}", "text": f"document {i} ✓"} for i in range(30)]
    lines = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows[:10])
    write_source(src, "a.jsonl", lines)
    write_source(src, "b/b.jsonl.zst", zstandard.ZstdCompressor().compress(
        b"".join(json.dumps(r).encode() + b"\n" for r in rows[10:20])))
    write_source(src, "c.jsonl.gz", gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows[20:25])))
    pq.write_table(pa.Table.from_pylist(rows[25:30]), src / "d.parquet")
    write_source(src, "notes/readme.txt", "a plain text document\nwith two lines".encode())
    write_source(src, "empty.jsonl", b"")
    write_source(src, "empty2.jsonl.zst", b"")
    write_source(src, "image.png", b"\x89PNG")

    reg = registry_at(str(tmp_path / "store"))
    m = download(reg, DownloadConfig(source=str(src), name="all"))
    docs = list(iter_documents(reg, m))
    by_id = {d["id"]: d["text"] for d in docs}
    assert len(docs) == 31
    assert all(by_id[r["id"]] == r["text"] for r in rows)
    assert by_id["notes/readme.txt"] == "a plain text document\nwith two lines"
    assert m.stats.skipped_files == ["image.png"]
    assert m.stats.quarantined == 0 and m.stats.damaged_files == []

    # A glob picks a subset; a single file works too.
    g = download(reg, DownloadConfig(source=str(src / "*.jsonl*"), name="glob"))
    assert g.stats.documents == 15
    one = download(reg, DownloadConfig(source=str(src / "d.parquet"), name="one", limit=3))
    assert [d["id"] for d in iter_documents(reg, one)] == ["r25", "r26", "r27"]


def test_corrupt_compressed_files_keep_what_was_read(tmp_path):
    rng = random.Random(0)  # incompressible enough that the damage sits many slices in
    words = [f"w{rng.randrange(10**6)}" for _ in range(5000)]
    rows = [json.dumps({"id": str(i), "text": " ".join(rng.choices(words, k=i % 50))}).encode() for i in range(20000)]
    data = b"\n".join(rows) + b"\n"
    z = zstandard.ZstdCompressor(level=3).compress(data)
    src = tmp_path / "src"
    write_source(src, "truncated.jsonl.zst", z[: len(z) // 2])
    garbled = bytearray(z)
    garbled[len(z) // 2 : len(z) // 2 + 200] = b"\x00" * 200
    write_source(src, "garbled.jsonl.zst", bytes(garbled))
    write_source(src, "cut.jsonl.gz", gzip.compress(data)[: len(gzip.compress(data)) // 3])
    write_source(src, "z_good.jsonl", b'{"id": "fine", "text": "after the damage"}\n')

    reg = registry_at(str(tmp_path / "store"))
    m = download(reg, DownloadConfig(source=str(src), name="damaged"))
    damage = {d["file"]: d for d in m.stats.damaged_files}
    assert set(damage) == {"truncated.jsonl.zst", "garbled.jsonl.zst", "cut.jsonl.gz"}
    assert "truncated" in damage["truncated.jsonl.zst"]["error"]
    for name, d in damage.items():
        assert 0 < d["lines_read"] < 20000, name
    docs = list(iter_documents(reg, m))
    assert docs[-1]["id"] == "fine", "the job went on after the damaged files"
    # Every complete line read before the damage is kept; the cut line is quarantined.
    assert m.stats.documents == sum(d["lines_read"] for d in damage.values()) + 1
    q = quarantined(reg, m)
    assert len(q) == m.stats.quarantined == 3
    assert all(r["reason"].startswith("incomplete") and r["raw"] for r in q)
    assert {r["source"] for r in q} == set(damage)


def test_fifty_megabyte_document(tmp_path):
    big = "0123456789abcdef" * (50 * 2**20 // 16)
    src = write_source(tmp_path / "src", "big.jsonl", json.dumps({"id": "big", "text": big}).encode() + b"\n"
                       + b'{"id": "small", "text": "tiny"}\n')
    reg = registry_at(str(tmp_path / "store"))
    m = download(reg, DownloadConfig(source=str(src), name="big", part_bytes=10**6))
    docs = list(iter_documents(reg, m))
    assert [d["id"] for d in docs] == ["big", "small"]
    assert docs[0]["text"] == big
    assert m.stats.bytes == len(big) + 4
    assert len(m.parts) == 2, "the huge document fills a part on its own"


def test_huggingface_source_through_datasets_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    ds_dir = tmp_path / "my_dataset"
    write_source(ds_dir / "data", "train.jsonl",
                 b"".join(json.dumps({"doc_id": i, "content": f"row {i}"}).encode() + b"\n" for i in range(12)))
    reg = registry_at(str(tmp_path / "store"))
    m = download(reg, DownloadConfig(source=f"hf:{ds_dir}", name="hf", text_field="content", id_field="doc_id", limit=10))
    docs = list(iter_documents(reg, m))
    assert [d["id"] for d in docs] == [str(i) for i in range(10)]
    assert docs[3]["text"] == "row 3"
    with pytest.raises(SourceError, match="cannot open"):
        download(reg, DownloadConfig(source=f"hf:{tmp_path}/nope", name="hf2"))


def test_stdlib_corpus_ids_are_module_paths(tmp_path):
    reg = registry_at(str(tmp_path / "store"))
    m = download(reg, DownloadConfig(source="stdlib", name="stdlib", limit=400))
    ids = [d["id"] for d in iter_documents(reg, m)]
    assert len(ids) == 400 == len(set(ids))
    assert "__future__" in ids and "asyncio" in ids  # asyncio/__init__.py → the package name
    again = download(reg, DownloadConfig(source="stdlib", name="stdlib", limit=400))
    assert again.version == m.version, "the same job is reused, not committed twice"


def test_missing_source_and_bad_name(tmp_path):
    reg = registry_at(str(tmp_path / "store"))
    with pytest.raises(SourceError, match="not found"):
        download(reg, DownloadConfig(source=str(tmp_path / "missing.jsonl"), name="x"))
    with pytest.raises(ValueError, match="invalid name"):
        download(reg, DownloadConfig(source="stdlib", name="../escape"))


def test_interrupted_download_resumes_without_rewriting(tmp_path):
    """Kill a real download process mid-way; the rerun keeps finished parts byte for byte."""
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "cli.blt_data", "download", "stdlib", "--name", "std",
           "--part-size", "256KB", "--store", str(store), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done_dir = None
    while time.time() < deadline:
        found = list(store.glob("datasets/std/_jobs/*/_done/part-000003.json"))
        if found:
            done_dir = found[0].parent
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done_dir is not None, "the download never got to its fourth part"
    assert not (store / "datasets/std/v0001").exists(), "killed before the commit"
    finished = sorted(done_dir.glob("part-*.json"))
    job_dir = done_dir.parent
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in job_dir.glob("part-*.jsonl.zst")
            if (done_dir / p.name.replace(".jsonl.zst", ".json")).exists()}
    assert len(kept) == len(finished) >= 4

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name, stamp in kept.items():
        p = job_dir / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{name} was rewritten"

    reg = registry_at(str(store))
    resumed = reg.resolve("std")
    fresh = download(registry_at(str(tmp_path / "fresh")), DownloadConfig(source="stdlib", name="std", part_bytes=256_000))
    assert [p.sha256 for p in resumed.parts] == [p.sha256 for p in fresh.parts]
    assert resumed.stats == fresh.stats
    assert verify(reg, resumed) == []
