"""The shuffle on a real store (local folder and S3 on loopback): determinism, exactly-once,
the memory bound (runs), uniformity, lineage, reuse, resume after pass 1, and clear errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import zstandard
from pydantic import ValidationError

from blt_data.documents import DocumentWriter, encode_line, iter_lines, iter_part_lines
from blt_data.registry import Manifest, Registry, RegistryError
from blt_data.shuffle import (
    LINE_INDEX_BYTES,
    ShuffleConfig,
    _line_blocks,
    _write_runs,
    chunk_of,
    shuffle_documents,
)
from blt_data.storage import Store
from blt_data.verify import verify


def make_input(registry: Registry, name: str, num_docs: int, *, part_bytes: int = 4000, seed: int = 0) -> Manifest:
    """A documents dataset of ``num_docs`` documents of varied sizes (some non-ASCII) in several parts."""
    rng = np.random.default_rng(seed)
    writer = DocumentWriter(registry.store, registry.job_dir(name, "in"), "_jobs/in", target_part_bytes=part_bytes)
    text_bytes = 0
    for i in range(num_docs):
        text = f"doc {i} " + "é word " * int(rng.integers(0, 40))
        text_bytes += len(text.encode())
        writer.write_line(encode_line({"id": f"d{i:05d}", "text": text, "meta": {"n": i}}))
    parts = writer.close()
    manifest = Manifest(
        name=name,
        kind="documents",
        job_id="in",
        parts=parts,
        arrow_schema={"id": "string", "text": "large_string"},
        stats={"documents": num_docs, "bytes": text_bytes, "splits": {"train": num_docs}},
    )
    return registry.commit(manifest)


def ids_by_part(registry: Registry, manifest: Manifest) -> list[list[str]]:
    return [
        [json.loads(line)["id"] for line in iter_lines(registry.store, registry.part_path(manifest, p))]
        for p in manifest.parts
    ]


def line_bytes(registry: Registry, manifest: Manifest) -> int:
    return sum(len(line) + 1 for line in iter_part_lines(registry, manifest))


ARGS = dict(num_chunks=3, seed=7, memory_bytes=3000, val_docs=10)


@pytest.fixture
def registry(store_url) -> Registry:
    return Registry(Store.open(store_url))


def test_exactly_once_with_val_and_chunks(registry):
    source = make_input(registry, "raw", 200)
    out = shuffle_documents(registry, "raw", "shuf", **ARGS)

    assert out.kind == "documents" and out.version == 1
    val = out.parts_of("val")
    train = out.parts_of("train")
    assert sum(p.rows for p in val) == 10
    assert sorted({chunk_of(p) for p in train}) == [0, 1, 2]
    assert [chunk_of(p) for p in train] == sorted(chunk_of(p) for p in train)  # parts in chunk order
    rows = [sum(p.rows for p in train if chunk_of(p) == c) for c in range(3)]
    assert sum(rows) == 190 and max(rows) - min(rows) <= 1
    assert out.stats.documents == 200 and out.stats.splits == {"train": 190, "val": 10}
    assert out.stats.bytes == source.stats.bytes

    got = [i for part in ids_by_part(registry, out) for i in part]
    want = [json.loads(line)["id"] for line in iter_part_lines(registry, source)]
    assert Counter(got) == Counter(want) and len(got) == 200
    assert got != sorted(got)
    assert verify(registry, out) == []
    # Lines travel as raw bytes: every document is unchanged.
    assert sorted(iter_part_lines(registry, out)) == sorted(iter_part_lines(registry, source))


def test_deterministic_and_seed_dependent(registry):
    make_input(registry, "raw", 150)
    a = shuffle_documents(registry, "raw", "a", **ARGS)
    b = shuffle_documents(registry, "raw", "b", **ARGS)
    c = shuffle_documents(registry, "raw", "c", **{**ARGS, "seed": 8})

    assert a.job_id == b.job_id != c.job_id
    assert [p.sha256 for p in a.parts] == [p.sha256 for p in b.parts]
    assert ids_by_part(registry, a) == ids_by_part(registry, b)
    assert ids_by_part(registry, a) != ids_by_part(registry, c)
    # Memory decides which documents share a run, so it changes the order too.
    d = shuffle_documents(registry, "raw", "d", **{**ARGS, "memory_bytes": 5000})
    assert a.job_id != d.job_id and ids_by_part(registry, a) != ids_by_part(registry, d)


def test_memory_bound_means_several_runs_deleted_after_commit(registry):
    source = make_input(registry, "raw", 300)
    total = line_bytes(registry, source)
    memory = total // 6
    out = shuffle_documents(registry, "raw", "shuf", **{**ARGS, "memory_bytes": memory})

    assert out.params["max_run_bytes"] <= memory
    assert out.params["num_runs"] >= 6
    assert [f for f in registry.store.find("datasets/shuf") if "_runs" in f] == []
    assert verify(registry, out) == []


def test_document_larger_than_memory_is_a_run_of_its_own(registry):
    make_input(registry, "raw", 40)
    out = shuffle_documents(registry, "raw", "shuf", num_chunks=2, seed=1, memory_bytes=50, val_docs=3)

    assert out.params["num_runs"] == 40  # every line is longer than 50 bytes
    assert out.params["max_run_bytes"] > 50
    assert sorted(i for part in ids_by_part(registry, out) for i in part) == [f"d{i:05d}" for i in range(40)]


def test_chunks_split_into_parts_by_size(local_store_url):
    registry = Registry(Store.open(local_store_url))
    make_input(registry, "raw", 200)
    out = shuffle_documents(registry, "raw", "shuf", **ARGS, target_part_bytes=2000)

    train = out.parts_of("train")
    assert len(train) > 3 and [chunk_of(p) for p in train] == sorted(chunk_of(p) for p in train)
    assert train[0].path == f"_jobs/{out.job_id}/chunk-000000/part-000000.jsonl.zst"
    assert out.parts_of("val")[0].path == f"_jobs/{out.job_id}/val/part-000000.jsonl.zst"
    assert sum(p.rows for p in out.parts) == 200
    assert verify(registry, out) == []


def test_lineage(registry):
    source = make_input(registry, "raw", 50)
    out = shuffle_documents(registry, "raw@v1", "shuf", **ARGS, progress=True)

    assert out.parents == [source.ref]
    for key, value in ARGS.items():
        assert out.params[key] == value
    assert out.arrow_schema == source.arrow_schema
    assert out.quarantine == []


def test_rerun_reuses_committed_version(registry):
    source = make_input(registry, "raw", 60)
    first = shuffle_documents(registry, "raw", "shuf", **ARGS)
    for part in source.parts:  # a rerun that read anything would now fail
        registry.store.delete(registry.part_path(source, part))
    again = shuffle_documents(registry, "raw", "shuf", **ARGS)

    assert again == first
    assert registry.versions("shuf") == [1]


def test_rerun_after_pass_one_reuses_the_runs(local_store_url):
    registry = Registry(Store.open(local_store_url))
    source = make_input(registry, "raw", 80)
    reference = shuffle_documents(registry, "raw", "ref", **ARGS)
    # A job that died after pass 1: its runs are on the store, no manifest yet.
    job_dir = registry.job_dir("shuf", reference.job_id)
    _write_runs(registry, source, f"{job_dir}/_runs", ShuffleConfig(**ARGS), progress=False)
    for part in source.parts:
        registry.store.delete(registry.part_path(source, part))
    out = shuffle_documents(registry, "raw", "shuf", **ARGS)

    assert [p.sha256 for p in out.parts] == [p.sha256 for p in reference.parts]


def test_uniform_positions_over_seeds(local_store_url):
    """Runs of unequal size (4, 4, 1 documents): a merge that picked runs uniformly instead of by
    remaining size would put the lone document first a third of the time instead of a ninth."""
    registry = Registry(Store.open(local_store_url))
    writer = DocumentWriter(registry.store, registry.job_dir("raw", "in"), "_jobs/in")
    lines = [encode_line({"id": str(i), "text": "x" * 60}) for i in range(9)]
    assert len({len(line) for line in lines}) == 1
    for line in lines:
        writer.write_line(line)
    registry.commit(Manifest(name="raw", kind="documents", job_id="in", parts=writer.close(), stats={"documents": 9}))

    num_seeds = 270
    counts = np.zeros((9, 9), dtype=np.int64)  # document × position
    for seed in range(num_seeds):
        memory = 4 * (len(lines[0]) + LINE_INDEX_BYTES)
        out = shuffle_documents(registry, "raw", f"s{seed}", num_chunks=1, seed=seed, memory_bytes=memory, val_docs=0)
        assert out.params["num_runs"] == 3 and out.params["max_run_bytes"] == 4 * len(lines[0])
        for position, doc in enumerate(i for part in ids_by_part(registry, out) for i in part):
            counts[int(doc), position] += 1

    # Expected 30 per cell. Seeds are fixed, so this either always passes or never: the bounds
    # are wide (a cell outside [8, 60] has probability < 1e-6 under uniformity).
    assert counts.min() >= 8 and counts.max() <= 60, counts
    assert counts[8, 0] <= 55  # buggy merge: ~90
    chi2 = ((counts - 30) ** 2 / 30).sum()
    assert chi2 < 150, chi2  # 64 degrees of freedom: p(chi2 > 150) ≈ 1e-8


def test_clear_errors(registry):
    make_input(registry, "raw", 20)
    with pytest.raises(ValueError, match="val_docs=21 is more than the 20 documents"):
        shuffle_documents(registry, "raw", "shuf", num_chunks=1, seed=0, memory_bytes=10**6, val_docs=21)
    with pytest.raises(ValueError, match="some chunks would be empty"):
        shuffle_documents(registry, "raw", "shuf", num_chunks=6, seed=0, memory_bytes=10**6, val_docs=15)
    with pytest.raises(ValidationError, match="num_chunks"):
        shuffle_documents(registry, "raw", "shuf", num_chunks=0, seed=0, memory_bytes=10**6, val_docs=0)
    with pytest.raises(ValidationError, match="memory_bytes"):
        shuffle_documents(registry, "raw", "shuf", num_chunks=1, seed=0, memory_bytes=0, val_docs=0)
    with pytest.raises(ValidationError, match="extra"):
        ShuffleConfig(num_chunks=1, shards=3)
    with pytest.raises(ValueError, match="memory_bytes=1 is too small"):
        shuffle_documents(registry, "raw", "shuf", num_chunks=1, seed=0, memory_bytes=1, val_docs=0)
    registry.commit(Manifest(name="patched", kind="patches", job_id="p"))
    with pytest.raises(RegistryError, match="expected documents"):
        shuffle_documents(registry, "patched", "shuf", num_chunks=1, seed=0, memory_bytes=10**6, val_docs=0)
    assert registry.versions("shuf") == []


def test_line_blocks_reassemble_lines_across_reads(local_store_url):
    """Reads smaller than a line, and a last line without its newline, still give whole lines."""
    store = Store.open(local_store_url)
    lines = [b"a" * n for n in (1, 40, 3, 0, 100, 7)]
    store.write_bytes("x.jsonl.zst", zstandard.ZstdCompressor().compress(b"\n".join(lines)))
    for read_bytes in (1, 5, 16, 1 << 20):
        got = []
        for data, ends in _line_blocks(store.open_input("x.jsonl.zst", read_bytes), read_bytes):
            starts = np.concatenate(([0], ends[:-1]))
            got += [bytes(data[a:b]) for a, b in zip(starts, ends)]
        assert got == [line + b"\n" for line in lines]
        assert [g[:-1] for g in got] == list(iter_lines(store, "x.jsonl.zst"))
