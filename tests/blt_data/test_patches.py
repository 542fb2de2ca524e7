"""Patches format, units and repatch without Ray: round trips, readers other tools use, unit plans
that cover every line once, stats that add, and verify catching what it should."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pytest

from blt_data.documents import DocumentWriter, encode_line, iter_documents
from blt_data import patch_units
from blt_data.patch_units import (
    MIN_UNIT_BYTES, Completion, PartReader, UnitRecord, UnitSpec, commit_patches, load_plan, patch_unit,
    plan_units, read_records, read_unit, save_plan, unit_size,
)
from blt_data.patches import (
    ROW_GROUP_ROWS, PatchesPartWriter, build_table, entropies_array, part_metadata, read_part, write_part,
)
from blt_data.patching import PatchRule, patch_lengths, patch_lengths_arrow
from blt_data.registry import Manifest, PartInfo, Registry
from blt_data.repatch import RepatchConfig, RepatchError, repatch
from blt_data.stats import ENTROPY_BINS, DatasetStats
from blt_data.storage import Store
from blt_data.verify import verify, verify_patches

TEXTS = ["hello world, hello patches", "", "é😀 unicode ok", "x" * 300, "short"]


def fake_score(texts):
    """Deterministic stand-in for a model: entropy of byte j = (byte value % 7) / 2 nats."""
    for t in texts:
        yield (np.frombuffer(t.encode(), np.uint8) % 7).astype(np.float32) / 2


def docs_dataset(reg: Registry, n: int = 40, part_bytes: int = 300) -> Manifest:
    folder = reg.job_dir("docs", "j")
    with DocumentWriter(reg.store, folder, "_jobs/j", target_part_bytes=part_bytes) as w:
        for i in range(n):
            w.write_line(encode_line({"id": f"d{i}", "text": TEXTS[i % len(TEXTS)] + f" #{i}"}))
    text_bytes = sum(len((TEXTS[i % len(TEXTS)] + f" #{i}").encode()) for i in range(n))
    return reg.commit(Manifest(name="docs", kind="documents", job_id="j", parts=w.parts,
                               stats={"documents": n, "bytes": text_bytes, "splits": {"train": n}}))


def table_of(texts, entropies=True):
    text = pa.array(texts, pa.large_string())
    ents = entropies_array([np.asarray(e).astype(np.float16) for e in fake_score(texts)]) if entropies else None
    cfg = PatchRule(scheme="entropy", threshold=1.0) if entropies else PatchRule(scheme="space")
    pl = patch_lengths_arrow(text, ents, cfg)
    return build_table([f"id{i}" for i in range(len(texts))], text, pl, ents)


@pytest.mark.parametrize("background", [False, True])
def test_part_written_in_pieces_is_the_part_written_at_once(local_store_url, background):
    """Row groups of ROW_GROUP_ROWS from the part's start and one chunk per column: the same
    bytes however the rows come (import writes a batch at a time, on a worker thread)."""
    store = Store.open(local_store_url)
    rng = np.random.default_rng(0)
    texts = [TEXTS[i] for i in rng.integers(0, len(TEXTS), 2 * ROW_GROUP_ROWS + 123)]
    table = table_of(texts)
    whole = write_part(store, "a/part.parquet", "part.parquet", table, dataset="ds", job_id="j")
    writer = PatchesPartWriter(store, "b/part.parquet", "part.parquet", table.schema, dataset="ds", job_id="j", background=background)
    start = 0
    while start < table.num_rows:
        size = int(rng.integers(0, 3000))
        writer.write(table.slice(start, size))
        start += size
    pieces = writer.close()
    assert (pieces.sha256, pieces.rows, pieces.bytes) == (whole.sha256, whole.rows, whole.bytes)
    assert read_part(store, "b/part.parquet").equals(read_part(store, "a/part.parquet"))
    empty = PatchesPartWriter(store, "c/part.parquet", "part.parquet", table.schema, dataset="ds", job_id="j", background=background)
    assert empty.close().rows == 0 and read_part(store, "c/part.parquet").num_rows == 0


@pytest.mark.parametrize("with_entropies", [True, False])
def test_part_round_trip_and_other_readers(store_url, tmp_path, with_entropies):
    store = Store.open(store_url)
    table = table_of(TEXTS, with_entropies)
    info = write_part(store, "x/part-000000.parquet", "part-000000.parquet", table, dataset="ds", job_id="job1")
    again = write_part(store, "y/part-000000.parquet", "part-000000.parquet", table, dataset="ds", job_id="job1")
    assert info.sha256 == again.sha256 and info.rows == len(TEXTS)  # deterministic bytes
    back = read_part(store, "x/part-000000.parquet")
    assert back.select(table.column_names).equals(table)
    assert back.schema.field("patch_lengths").type == pa.list_(pa.int32())
    assert part_metadata(store, "x/part-000000.parquet") == {
        "blt.format": "patches", "blt.format_version": "2", "blt.dataset": "ds", "blt.job_id": "job1"}
    if not store.is_local:
        return
    files = [store.path("x/part-000000.parquet"), store.path("y/part-000000.parquet")]
    assert pds.dataset(files, format="parquet").count_rows() == 2 * len(TEXTS)
    import datasets

    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds[0]["id"] == "id0" and sum(ds[2]["patch_lengths"]) == len(TEXTS[2].encode())
    assert ("entropies" in ds.features) == with_entropies


def test_unit_stats_add_like_the_whole():
    a, b = table_of(TEXTS[:2]), table_of(TEXTS[2:])
    whole = table_of(TEXTS)

    def stats(t):
        return DatasetStats.of(t.column("patch_lengths").combine_chunks(), t.column("entropies").combine_chunks().values.to_numpy())

    total = stats(a) + stats(b)
    ref = stats(whole)
    assert total.model_dump(exclude={"entropy_sum"}) == ref.model_dump(exclude={"entropy_sum"})
    assert total.entropy_sum == pytest.approx(ref.entropy_sum)
    assert len(total.entropy_histogram) == ENTROPY_BINS and sum(total.entropy_histogram) == total.bytes
    q = total.entropy_quantiles
    assert 0 <= q["q01"] <= q["q50"] <= q["q99"] <= 3.5
    assert (DatasetStats() + stats(a)).documents == 2  # an empty start adds cleanly


def test_units_cover_every_line_once_and_respect_the_size(local_store_url):
    reg = Registry(Store.open(local_store_url))
    docs = docs_dataset(reg)
    units = plan_units(reg, docs, unit_bytes=120)
    assert units == plan_units(reg, docs, unit_bytes=120)
    assert [u.index for u in units] == list(range(len(units)))
    seen = []
    for u in units:
        assert u.bytes <= 120 or u.stop - u.start == 1  # a longer single document is a unit alone
        ids, _ = read_unit(reg.store, reg.dataset_dir("docs"), u)
        seen += ids
    assert seen == [d["id"] for d in iter_documents(reg, docs)]


def test_patch_unit_writes_part_then_record_and_verify_checks_content(local_store_url):
    reg = Registry(Store.open(local_store_url))
    docs = docs_dataset(reg)
    units = plan_units(reg, docs, unit_bytes=400)
    spec = UnitSpec(input_dir=reg.dataset_dir("docs"), output_dir=reg.dataset_dir("out"), name="out", job_id="jj",
                    patch=PatchRule(scheme="entropy", threshold=1.2), keep_entropies=True)
    records = [patch_unit(reg.store, u, spec, fake_score) for u in units]
    assert read_records(reg.store, spec.job_dir, UnitRecord) == {r.unit: r for r in records}
    table = read_part(reg.store, f"{spec.job_dir}/part-000000.parquet")
    for text, pl, ent in zip(*(table.column(c).to_pylist() for c in ("text", "patch_lengths", "entropies"))):
        expected_e = next(fake_score([text])).astype(np.float16)
        assert np.array_equal(np.array(ent, np.float16), expected_e)
        assert pl == patch_lengths(text, expected_e, spec.patch).tolist()

    stats = sum((r.stats for r in records), DatasetStats())
    manifest = reg.commit(Manifest(
        name="out", kind="patches", job_id="jj", parents=["docs@v1"], params={"input": "docs@v1"},
        arrow_schema={"entropies": "list<item: halffloat>"}, parts=[r.part for r in records],
        stats=stats.model_copy(update={"splits": {"train": stats.documents}}),
    ))
    assert verify(reg, manifest) == []

    # A part whose patch lengths do not add up, re-hashed so only the content check can catch it.
    bad = table.set_column(2, "patch_lengths", pa.array([[1]] * table.num_rows, pa.list_(pa.int32())))
    info = write_part(reg.store, f"{spec.job_dir}/part-000000.parquet", records[0].part.path, bad, dataset="out", job_id="jj")
    tampered = manifest.model_copy(update={"parts": [info, *manifest.parts[1:]]})
    problems = verify_patches(reg, tampered)
    assert any("patch lengths sum to" in p for p in problems)
    # A dataset missing a unit: ids no longer equal the input's.
    short = manifest.model_copy(update={"parts": manifest.parts[1:]})
    assert any("ids differ from docs@v1" in p for p in verify_patches(reg, short))


def test_repatch_refuses_what_it_cannot_use(local_store_url):
    reg = Registry(Store.open(local_store_url))
    docs_dataset(reg)
    with pytest.raises(RepatchError, match="is a documents dataset"):
        repatch(reg, RepatchConfig(patches="docs", name="r", rule=PatchRule(threshold=1.0)))
    with pytest.raises(ValueError, match="exactly one of threshold and target_patch_size"):
        RepatchConfig(patches="docs", name="r")
    assert json.loads(RepatchConfig(patches="p", name="r", rule=PatchRule(threshold=2)).model_dump_json())["rule"]["scheme"] == "entropy"


def test_repatch_by_row_group_writes_what_patching_the_whole_part_writes(local_store_url):
    """Repatch streams a part row group by row group: same bytes and stats as patching the whole
    part at once (the way it was first written), over several row groups with eos_entropy."""
    reg = Registry(Store.open(local_store_url))
    rng = np.random.default_rng(1)
    texts = [TEXTS[i] + "é" * int(k) for i, k in zip(rng.integers(0, len(TEXTS), ROW_GROUP_ROWS + 700), rng.integers(0, 9, ROW_GROUP_ROWS + 700))]
    table = table_of(texts)
    table = table.append_column(pa.field("eos_entropy", pa.float16()), pa.array(rng.random(len(texts)).astype(np.float16)))
    info = write_part(reg.store, reg.job_dir("p", "j") + "/part-000000.parquet", "_jobs/j/part-000000.parquet", table, dataset="p", job_id="j")
    reg.commit(Manifest(name="p", kind="patches", job_id="j", parts=[info], arrow_schema={f.name: str(f.type) for f in table.schema},
                        params={"scheme": "entropy", "threshold": 1.0}, stats={"documents": len(texts), "splits": {"train": len(texts)}}))
    rule = PatchRule(threshold=0.7, max_patch_length=5)
    out = repatch(reg, RepatchConfig(patches="p", name="r", rule=rule))
    pl = patch_lengths_arrow(table.column("text").combine_chunks(), table.column("entropies").combine_chunks(), rule)
    whole = build_table(table.column("id").to_pylist(), table.column("text").combine_chunks(), pl,
                        table.column("entropies").combine_chunks(), table.column("eos_entropy").combine_chunks())
    expected = write_part(reg.store, "x/part.parquet", out.parts[0].path, whole, dataset="r", job_id=out.job_id)
    assert out.parts[0].sha256 == expected.sha256
    stats = DatasetStats.of(pl, table.column("entropies").combine_chunks().values.to_numpy())
    assert (out.stats.entropy_histogram, out.stats.entropy_sum, out.stats.patch_length_histogram) == (
        stats.entropy_histogram, stats.entropy_sum, stats.patch_length_histogram)


def _patched_units(reg: Registry, unit_bytes: int = 150):
    docs = docs_dataset(reg)
    units = plan_units(reg, docs, unit_bytes=unit_bytes)
    spec = UnitSpec(input_dir=reg.dataset_dir("docs"), output_dir=reg.dataset_dir("out"), name="out", job_id="jj",
                    patch=PatchRule(scheme="entropy", threshold=1.2), keep_entropies=True)
    return units, spec


def test_a_reader_carried_across_units_reads_what_fresh_reads_do(local_store_url):
    reg = Registry(Store.open(local_store_url))
    units, spec = _patched_units(reg)
    fresh = [read_unit(reg.store, spec.input_dir, u) for u in units]
    reader = PartReader(reg.store, spec.input_dir)
    # In order (one read per part), then backwards and skipping (the reader reopens the part).
    assert [read_unit(reg.store, spec.input_dir, u, reader) for u in units] == fresh
    order = [5, 2, 7, 3, 0]
    assert [read_unit(reg.store, spec.input_dir, units[i], reader) for i in order] == [fresh[i] for i in order]


def test_stored_plan_reads_back_and_is_stored_once(local_store_url):
    reg = Registry(Store.open(local_store_url))
    units, spec = _patched_units(reg)
    assert load_plan(reg.store, spec.job_dir) is None
    assert save_plan(reg.store, spec.job_dir, units) and not save_plan(reg.store, spec.job_dir, units[:1])
    assert load_plan(reg.store, spec.job_dir) == units


def test_unit_size_shrinks_on_small_inputs_only():
    docs = Manifest(name="d", kind="documents", job_id="j", stats={"documents": 10, "bytes": 100 * 10**6},
                    parts=[PartInfo(path=f"p{i}", rows=5, bytes=b, sha256="0" * 64) for i, b in enumerate((3000, 1000))])
    assert unit_size(16 * 10**6, docs, docs.parts, min_units=64) == math.ceil(100 * 10**6 / 64)
    assert unit_size(16 * 10**6, docs, docs.parts, min_units=4) == 16 * 10**6
    assert unit_size(16 * 10**6, docs, docs.parts[1:], min_units=64) == math.ceil(25 * 10**6 / 64)  # a quarter of the bytes
    assert unit_size(16 * 10**6, docs, docs.parts, min_units=10**6) == MIN_UNIT_BYTES
    assert unit_size(2000, docs, docs.parts, min_units=10**6) == 2000  # asked smaller still: as asked


def test_compacted_records_survive_a_crash_between_write_and_delete(local_store_url, monkeypatch):
    """Batches of 2 units, then of 4: complete ones are written and what they replace goes; the
    short last node stays a level below. A crash after a batch is written but before what it
    replaces is deleted leaves duplicates: a restart takes the widest batch, deletes the rest,
    and the commit is the one an uncompacted job makes (float sums too: both add the same tree)."""
    monkeypatch.setattr(patch_units, "BATCH_LEVELS", (2, 4))
    reg = Registry(Store.open(local_store_url))
    units, spec = _patched_units(reg, unit_bytes=1000)
    assert len(units) == 9
    records = [patch_unit(reg.store, u, spec, fake_score) for u in units]
    done_dir = Path(reg.store.path(spec.job_dir)) / "_done"

    plain = Completion.load(reg.store, spec.job_dir, len(units))  # loose records only, not compacted
    assert len(plain) == 9 and plain.ordered_parts() == [r.part for r in records]
    pair = lambda c: sum((r.stats for r in records[c:c + 2]), DatasetStats())  # noqa: E731
    expected = sum((sum((pair(c) for c in range(q, min(q + 4, 9), 2)), DatasetStats()) for q in range(0, 9, 4)), DatasetStats())
    assert plain.stats() == expected

    done = Completion(reg.store, spec.job_dir, len(units))
    for r in records[:6]:
        done.add(r)
    assert sorted(p.name for p in done_dir.iterdir()) == [
        "batch-000000-000003.json", "batch-000004-000005.json", "unit-000006.json", "unit-000007.json", "unit-000008.json"]
    small = (done_dir / "batch-000004-000005.json").read_bytes()
    for r in records[6:]:
        done.add(r)
    compacted = ["batch-000000-000003.json", "batch-000004-000007.json", "unit-000008.json"]
    assert sorted(p.name for p in done_dir.iterdir()) == compacted
    # The crash, at both levels: the batch of units 4-5 and the loose records of units 4..7 back
    # (redone: the same bytes), as if nothing had been deleted after batch 4-7 was written.
    (done_dir / "batch-000004-000005.json").write_bytes(small)
    for u in units[4:8]:
        assert patch_unit(reg.store, u, spec, fake_score) == records[u.index]
    assert len(list(done_dir.iterdir())) == 8
    again = Completion.load(reg.store, spec.job_dir, len(units))
    assert sorted(p.name for p in done_dir.iterdir()) == compacted  # the duplicates are gone
    assert len(again) == 9 and all(i in again for i in range(9)) and 9 not in again
    assert again.ordered_parts() == [r.part for r in records] and again.stats() == expected
    m = commit_patches(reg, spec, again, spec.patch, None, ["docs@v1"], {})
    assert m.parts == [r.part for r in records] and m.stats.entropy_sum == expected.entropy_sum
    assert verify(reg, m) == []
    assert sorted(read_records(reg.store, spec.job_dir, UnitRecord)) == [8]  # loose-record readers skip batches


def test_a_batch_that_does_not_fit_the_plan_is_refused(local_store_url, monkeypatch):
    monkeypatch.setattr(patch_units, "BATCH_LEVELS", (3, 6))
    reg = Registry(Store.open(local_store_url))
    units, spec = _patched_units(reg, unit_bytes=1000)
    done = Completion(reg.store, spec.job_dir, len(units))
    for u in units[:3]:
        done.add(patch_unit(reg.store, u, spec, fake_score))
    monkeypatch.setattr(patch_units, "BATCH_LEVELS", (4, 8))  # read with other batch sizes: another plan
    with pytest.raises(ValueError, match="batch-000000-000002.json does not match this job's plan"):
        Completion.load(reg.store, spec.job_dir, len(units))
