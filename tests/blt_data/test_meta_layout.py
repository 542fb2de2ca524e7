"""Meta's preprocessed layout out (export) and in (import-preprocessed), checked against Meta's rule
written here from its description (issue 12) and, where Meta's source is at hand, against Meta's
own loader (ArrowFileIterator + PreprocessIterator: its glob, markers, tokenizer and Patcher)."""

from __future__ import annotations

import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from blt_data.documents import iter_lines
from blt_data.meta_layout import (
    COMPLETE, CONFIG_FILE, META_SCHEMA, MetaExportConfig, MetaImportConfig, MetaLayoutError, export_meta,
    import_preprocessed, meta_threshold,
)
from blt_data.patches import (
    arrow_schema_summary, build_table, entropies_array, part_name, read_patches, write_part,
)
from blt_data.patching import PatchRule, patch_lengths_arrow
from blt_data.registry import Manifest, Registry
from blt_data.stats import DatasetStats
from blt_data.storage import Store
from blt_data.verify import verify

THRESHOLD = 1.3  # not a float16: Meta's float32 comparison needs the exported one
F16_NEAR = [float(np.float16(1.3)), float(np.nextafter(np.float16(1.3), np.float16(0))),
            float(np.nextafter(np.float16(1.3), np.float16(9)))]  # values either side of θ


def make_docs(n: int, seed: int) -> list[tuple[str, str, np.ndarray, float]]:
    """(id, text, entropies (float16, one per byte), eos_entropy) with edge cases: empty and 1-byte
    documents, non-ASCII text, long runs, entropies right at and beside the threshold."""
    rng = np.random.default_rng(seed)
    words = ["the", "byte", "latent", "é", "😀", "日本語", "x" * 40, "patch", ","]
    docs = []
    for i in range(n):
        if i % 11 == 0:
            text = ""
        elif i % 11 == 1:
            text = "a"
        else:
            text = " ".join(rng.choice(words, size=int(rng.integers(1, 25))))
        size = len(text.encode())
        e = rng.uniform(0, 2.6, size).astype(np.float16)
        near = rng.random(size) < 0.2
        e[near] = rng.choice(F16_NEAR, size=int(near.sum()))
        eos = np.float16(rng.choice([0.2, 2.5, *F16_NEAR]))
        docs.append((f"doc{i:04d}", text, e, float(eos)))
    return docs


def commit_dataset(reg: Registry, name: str, docs, *, scheme="entropy", threshold=THRESHOLD, max_len=None,
                   eos=True, parts=3, split_val=0) -> Manifest:
    """A patches dataset made with the library's own writers (what the patch job writes), from
    synthetic entropies; the last `split_val` documents form a 'val' part."""
    cfg = PatchRule(scheme=scheme, threshold=threshold, max_patch_length=max_len)
    job = "job-" + name
    groups = [("train", g) for g in np.array_split(np.arange(len(docs) - split_val), parts)]
    if split_val:
        groups.append(("val", np.arange(len(docs) - split_val, len(docs))))
    infos, stats = [], DatasetStats()
    for index, (split, idx) in enumerate(groups):
        chosen = [docs[i] for i in idx]
        text = pa.array([d[1] for d in chosen], pa.large_string())
        ents = entropies_array([d[2] for d in chosen])
        pl = patch_lengths_arrow(text, ents, cfg)
        eos_col = pa.array([d[3] for d in chosen], pa.float16()) if eos else None
        table = build_table([d[0] for d in chosen], text, pl, ents, eos_col)
        infos.append(write_part(reg.store, f"{reg.job_dir(name, job)}/{part_name(index)}", f"_jobs/{job}/{part_name(index)}",
                                table, dataset=name, job_id=job, split=split))
        stats = stats + DatasetStats.of(pl, ents.values.to_numpy())
    params = {"scheme": scheme, "threshold": threshold, "max_patch_length": max_len,
              "model": {"ref": "ent@v2", "sha256": "0" * 64}, "entropies": True}
    return reg.commit(Manifest(
        name=name, kind="patches", job_id=job, params=params, arrow_schema=arrow_schema_summary(True, eos),
        parts=infos, stats=stats.model_copy(update={"splits": {"train": len(docs) - split_val, "val": split_val}}),
    ))


def meta_rule(values, threshold, max_patch_length=None, monotonicity=False) -> list[int]:
    """Meta's patch lengths over BOS + bytes + EOS, from the rule as issue 12 states it: BOS and byte
    0 start patches; token p >= 2 starts one when value p-1 > threshold (float32); monotonic: when
    value p-1 - value p-2 > threshold for p >= 3; then longer pieces are split from their start."""
    v = np.asarray(values, np.float32)
    t = np.float32(threshold)
    starts = [0, 1]
    for p in range(2, len(v)):
        if monotonicity:
            if p == 2 or (v[p - 1] - v[p - 2]) > t:
                starts.append(p)
        elif v[p - 1] > t:
            starts.append(p)
    lengths = [b - a for a, b in zip(starts, starts[1:] + [len(v)])]
    if max_patch_length:
        split = []
        for n in lengths:
            while n > max_patch_length:
                split.append(max_patch_length)
                n -= max_patch_length
            split.append(n)
        lengths = split
    return lengths


def read_meta_shards(out: str) -> tuple[dict, list[str], dict[str, list[dict]]]:
    """The exported layout as Meta's loader finds it (args.py find_and_sanitize_chunks, then
    arrow_iterator.py for each chunk): config block, chunk files, and each chunk's rows."""
    cfg = yaml.safe_load(Store.open(out).read_text(CONFIG_FILE))["data"]
    (source,) = cfg["sources"]
    fs, root = Store.open(cfg["root_dir"]).fs, cfg["root_dir"]
    chunks = sorted(fs.glob(f"{root}/{source}/*.chunk.*.jsonl"))
    rows = {}
    for chunk in chunks:
        dataset = re.match(r"(.+)\.chunk\.[0-9]+\.jsonl", os.path.basename(chunk)).group(1)
        data_dir = f"{cfg['preprocess_dir']}/{dataset}/{cfg['entropy_model_name']}"
        shards = fs.glob(f"{data_dir}/{os.path.basename(chunk)}.shard_*.arrow")
        for s in shards:
            assert fs.exists(f"{data_dir}/{os.path.basename(s)}.complete"), f"Missing .complete for {s}"
        shards.sort(key=lambda s: int(re.search(r".+\.shard_([0-9]+)\.arrow", s).group(1)))
        assert shards, f"zero shards for {chunk}"
        rows[os.path.basename(chunk)] = []
        for s in shards:
            with fs.open(s, "rb") as f:
                reader = pa.ipc.open_file(f)  # the IPC *file* format, as Meta's pa.dataset(format="arrow")
                assert reader.schema == META_SCHEMA
                for i in range(reader.num_record_batches):
                    batch = reader.get_batch(i)
                    assert batch.num_rows <= 1000
                    rows[os.path.basename(chunk)] += batch.to_pylist()
    return cfg, chunks, rows


def our_rows(reg: Registry, ref: str, split="train") -> list[dict]:
    m = reg.resolve(ref)
    m = m.model_copy(update={"parts": m.parts_of(split)})
    return read_patches(reg, m).to_pylist()


@pytest.mark.parametrize("max_len", [None, 6])
def test_export_layout_and_meta_rule_give_our_patch_lengths(store_url, tmp_path, max_len):
    reg = Registry(Store.open(store_url))
    docs = make_docs(70, seed=1)
    commit_dataset(reg, "corpus", docs, max_len=max_len, split_val=5)
    out = f"{store_url}-export" if store_url.startswith("s3://") else str(tmp_path / "export")
    result = export_meta(reg, MetaExportConfig(patches="corpus", out=out, chunks=3, shard_bytes=2000, batch_rows=4))
    assert result.documents == 65 and result.differing_documents == 0

    # Files and names exactly as Meta's layout has them, markers beside every shard.
    store = Store.open(out)
    found = store.find()
    shards = [p for p in found if p.endswith(".arrow")]
    assert {p for p in found if p.endswith(COMPLETE)} == {s + COMPLETE for s in shards}
    assert sorted(p for p in found if p.endswith(".jsonl")) == [f"data/corpus/corpus.chunk.{c:02d}.jsonl" for c in range(3)]
    for s in shards:
        assert re.fullmatch(r"preprocess/corpus/ent_v2/corpus\.chunk\.0[0-2]\.jsonl\.shard_\d\d\.arrow", s), s
    assert len(shards) > 3  # shard_bytes made several shards per chunk
    assert set(found) == {*shards, *(s + COMPLETE for s in shards), *(f"data/corpus/corpus.chunk.{c:02d}.jsonl" for c in range(3)), CONFIG_FILE}

    cfg, chunks, rows = read_meta_shards(out)
    assert cfg["patcher_args"] == {"patching_mode": "entropy", "realtime_patching": False,
                                   "threshold": meta_threshold(THRESHOLD), "max_patch_length": max_len, "monotonicity": False}
    assert cfg["sources"] == {"corpus": 1.0} and cfg["entropy_model_name"] == "ent_v2"
    assert cfg["tokenizer_args"] == {"name": "blt"} and cfg["file_format"] == "arrow"
    assert result.config_yaml in Store.open(out).read_text(CONFIG_FILE)

    # Documents in the dataset's order, split evenly over the chunks; value n = eos_entropy, n + 1 = 0.
    ours = our_rows(reg, "corpus")
    exported = [r for c in sorted(rows) for r in rows[c]]
    assert [len(rows[c]) for c in sorted(rows)] == [21, 22, 22]
    assert [r["sample_id"] for r in exported] == [r["id"] for r in ours]
    for mine, theirs in zip(ours, exported):
        n = len(mine["text"].encode())
        assert theirs["text"] == mine["text"] and len(theirs["entropies"]) == n + 2
        assert theirs["entropies"][:n] == mine["entropies"]
        assert theirs["entropies"][n] == mine["eos_entropy"] and theirs["entropies"][n + 1] == 0
        # Meta's rule on what it reads gives our patch lengths with BOS first and EOS placed.
        meta = meta_rule(theirs["entropies"], cfg["patcher_args"]["threshold"], max_len)
        eos_own = n == 0 or mine["eos_entropy"] > THRESHOLD
        expected = [1] + list(mine["patch_lengths"])
        if eos_own:
            expected.append(1)
        else:
            expected[-1] += 1
            if max_len and expected[-1] > max_len:
                expected[-1:] = [max_len, 1]
        assert meta == expected, (mine["id"], meta, expected)
        assert sum(meta) == n + 2


def test_export_threshold_exact_where_float32_rounding_would_not_be():
    # θ just below a float16 value v: v > θ, but float32(θ) could round up to v and say v is not > θ.
    v = np.float16(1.5)
    theta = float(v) - 1e-12
    assert not np.float32(v) > np.float32(theta)  # Meta with the raw θ would miss this start
    t = meta_threshold(theta)
    assert np.float32(v) > np.float32(t) and np.float16(t) == np.nextafter(v, np.float16(0))
    for x in np.arange(0, 6, 1 / 1024, dtype=np.float16):  # every float16 in a range: same decisions
        assert (np.float32(x) > np.float32(t)) == (float(x) > theta)


def test_export_refuses_what_meta_cannot_reproduce(local_store_url, tmp_path):
    reg = Registry(Store.open(local_store_url))
    docs = make_docs(12, seed=2)
    commit_dataset(reg, "mono", docs, scheme="monotonic", threshold=0.4)
    commit_dataset(reg, "old", docs, eos=False)
    out = str(tmp_path / "x")
    with pytest.raises(MetaLayoutError, match="always starts a patch at byte 1.*--accept-monotonic-difference"):
        export_meta(reg, MetaExportConfig(patches="mono", out=out))
    with pytest.raises(MetaLayoutError, match="no end-of-document entropy.*run blt-data patch again"):
        export_meta(reg, MetaExportConfig(patches="old", out=out))
    with pytest.raises(MetaLayoutError, match="more than the 12 documents"):
        export_meta(reg, MetaExportConfig(patches="mono", out=out, chunks=13, accept_monotonic_difference=True))
    assert not Path(out).exists() or not any(Path(out).rglob("*.arrow"))

    # Accepted monotonic: Meta's own monotonic rule on the exported values, counted differences.
    result = export_meta(reg, MetaExportConfig(patches="mono", out=out, accept_monotonic_difference=True))
    cfg, _, rows = read_meta_shards(out)
    assert cfg["patcher_args"]["monotonicity"] is True
    differ = 0
    for mine, theirs in zip(our_rows(reg, "mono"), [r for c in sorted(rows) for r in rows[c]]):
        n = len(mine["text"].encode())
        meta = meta_rule(theirs["entropies"], cfg["patcher_args"]["threshold"], None, monotonicity=True)
        assert sum(meta) == n + 2
        e = mine["entropies"]
        eos_own = n == 0 or mine["eos_entropy"] - e[n - 1] > 0.4
        expected = [1] + list(mine["patch_lengths"])
        expected = expected + [1] if eos_own else expected[:-1] + [expected[-1] + 1]
        differ += meta != expected
    assert differ == result.differing_documents > 0
    # A second export into the same folder would mix with the first in Meta's glob.
    with pytest.raises(MetaLayoutError, match="already holds files"):
        export_meta(reg, MetaExportConfig(patches="mono", out=out, accept_monotonic_difference=True))


def test_export_refuses_other_schemes_and_no_entropies(local_store_url, tmp_path):
    reg = Registry(Store.open(local_store_url))
    text = pa.array(["a b", "cd"], pa.large_string())
    pl = patch_lengths_arrow(text, None, PatchRule(scheme="space"))
    info = write_part(reg.store, f"{reg.job_dir('sp', 'j')}/{part_name(0)}", f"_jobs/j/{part_name(0)}",
                      build_table(["a", "b"], text, pl, None), dataset="sp", job_id="j")
    reg.commit(Manifest(name="sp", kind="patches", job_id="j", params={"scheme": "space"}, parts=[info],
                        arrow_schema=arrow_schema_summary(False), stats={"documents": 2, "splits": {"train": 2}}))
    with pytest.raises(MetaLayoutError, match="'space' scheme"):
        export_meta(reg, MetaExportConfig(patches="sp", out=str(tmp_path / "x")))
    reg.commit(Manifest(name="noent", kind="patches", job_id="j", params={"scheme": "entropy", "threshold": 1.0},
                        parts=[info], arrow_schema=arrow_schema_summary(False), stats={"documents": 2}))
    with pytest.raises(MetaLayoutError, match="no stored entropies"):
        export_meta(reg, MetaExportConfig(patches="noent", out=str(tmp_path / "x")))


def test_export_then_import_gives_back_ids_text_entropies_and_patch_lengths(store_url, tmp_path):
    reg = Registry(Store.open(store_url))
    docs = make_docs(50, seed=3)
    commit_dataset(reg, "src", docs, max_len=8)
    out = f"{store_url}-meta" if store_url.startswith("s3://") else str(tmp_path / "meta")
    export_meta(reg, MetaExportConfig(patches="src", out=out, chunks=2, shard_bytes=1500, batch_rows=4))
    m = import_preprocessed(reg, MetaImportConfig(source=f"{out}/preprocess", name="back", rule=PatchRule(threshold=THRESHOLD, max_patch_length=8),
                                                  model="ent"))
    assert m.kind == "patches" and m.params["entropy_model_name"] == "ent"  # not in this registry: Meta's name
    assert m.params["source"].endswith("/preprocess") and m.params["source_dataset"] == "src"
    assert m.stats.quarantined == 0 and not m.stats.damaged_files
    assert [r for r in our_rows(reg, "back")] == our_rows(reg, "src")
    assert verify(reg, m) == []
    again = import_preprocessed(reg, MetaImportConfig(source=f"{out}/preprocess", name="back", rule=PatchRule(threshold=THRESHOLD, max_patch_length=8),
                                                      model="ent"))
    assert again.ref == m.ref  # the same job is not done twice

    # Another rule from the same entropies, a registry model as lineage, and a target patch size.
    reg.commit(Manifest(name="ent", kind="entropy-model", job_id="m", params={"sha256": "ab" * 32}))
    t = import_preprocessed(reg, MetaImportConfig(source=out, name="sized", rule=PatchRule(target_patch_size=3.0), model="ent"))
    assert t.parents == ["ent@v1"] and t.params["model"] == {"ref": "ent@v1", "sha256": "ab" * 32}
    assert t.params["calibration"]["target"] == 3.0 and abs(t.stats.mean_patch_length - 3.0) < 0.5
    rows = our_rows(reg, "sized")
    assert [r["entropies"] for r in rows] == [r["entropies"] for r in our_rows(reg, "src")]


def test_import_started_again_redoes_only_unfinished_shards(local_store_url, tmp_path):
    reg = Registry(Store.open(local_store_url))
    commit_dataset(reg, "src", make_docs(40, seed=6))
    out = tmp_path / "meta"
    export_meta(reg, MetaExportConfig(patches="src", out=str(out), chunks=4))
    cfg = MetaImportConfig(source=str(out), name="imp", rule=PatchRule(threshold=THRESHOLD), part_bytes=300)
    whole = import_preprocessed(reg, cfg)
    assert len(whole.parts) > 4  # several parts per shard
    job = Path(local_store_url) / "datasets" / "imp" / "_jobs" / whole.job_id
    # A crash after shards 0 and 1: the later completion records and the manifest never landed.
    (Path(local_store_url) / "datasets" / "imp" / "v0001" / "manifest.json").unlink()
    for unit in (2, 3):
        (job / "_done" / f"unit-{unit:06d}.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in job.glob("part-*.parquet")}
    again = import_preprocessed(reg, cfg)
    after = {p.name: p.stat().st_mtime_ns for p in job.glob("part-*.parquet")}
    redone = {name for name in after if after[name] != before.get(name)}
    assert redone and all(name.startswith(("part-000002-", "part-000003-")) for name in redone)
    assert again.parts == whole.parts and again.stats == whole.stats and again.job_id == whole.job_id
    assert read_patches(reg, again).to_pylist() == read_patches(reg, reg.resolve("src")).to_pylist()


def test_repatch_keeps_the_end_of_document_entropy(local_store_url):
    from blt_data.repatch import RepatchConfig, repatch

    reg = Registry(Store.open(local_store_url))
    commit_dataset(reg, "src", make_docs(20, seed=8))
    m = repatch(reg, RepatchConfig(patches="src", name="rep", rule=PatchRule(threshold=0.9)))
    assert m.arrow_schema["eos_entropy"] == "halffloat" and m.params["eos_entropy"] is True
    src, rep = our_rows(reg, "src"), our_rows(reg, "rep")
    assert [r["eos_entropy"] for r in rep] == [r["eos_entropy"] for r in src]
    assert [r["patch_lengths"] for r in rep] != [r["patch_lengths"] for r in src]


def write_shard(path: Path, rows: list[dict], complete=True, schema=META_SCHEMA, batch_rows=4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_file(str(path), schema) as w:
        for i in range(0, len(rows), batch_rows):
            w.write_batch(pa.RecordBatch.from_pylist(rows[i:i + batch_rows], schema=schema))
    if complete:
        Path(str(path) + COMPLETE).touch()


def meta_row(i: int, text: str, extra: int = 2) -> dict:
    n = len(text.encode())
    return {"sample_id": str(i), "text": text, "entropies": [float(np.float16((j % 5) / 2)) for j in range(n + extra)]}


def test_import_reports_missing_markers_damage_and_bad_rows(local_store_url, tmp_path):
    reg = Registry(Store.open(local_store_url))
    folder = tmp_path / "pre" / "ds" / "m"
    good = [meta_row(i, f"doc {i} text") for i in range(10)]
    write_shard(folder / "ds.chunk.00.jsonl.shard_00.arrow", good)
    write_shard(folder / "ds.chunk.00.jsonl.shard_01.arrow", [meta_row(10, "no marker")], complete=False)
    cfg = dict(source=str(tmp_path / "pre"), name="imp", rule=PatchRule(threshold=1.0))
    with pytest.raises(MetaLayoutError, match=r"1 of 2 shards have no \.complete marker.*shard_01.*--skip-incomplete"):
        import_preprocessed(reg, MetaImportConfig(**cfg))
    m = import_preprocessed(reg, MetaImportConfig(**cfg, skip_incomplete=True))
    assert m.stats.documents == 10 and len(m.stats.skipped_files) == 1 and "shard_01" in m.stats.skipped_files[0]

    # Wrong entropy counts, a row without text, a repeated id; and a truncated shard (no footer).
    (folder / "ds.chunk.00.jsonl.shard_01.arrow").unlink()
    schema = pa.schema([pa.field("sample_id", pa.string()), pa.field("text", pa.string()), pa.field("entropies", pa.list_(pa.float16()))])
    bad = [meta_row(20, "short", extra=1), {"sample_id": "21", "text": None, "entropies": [0.0, 0.0]},
           meta_row(22, "fine"), meta_row(3, "same id as doc 3")]
    write_shard(folder / "ds.chunk.01.jsonl.shard_00.arrow", bad, schema=schema)
    truncated = folder / "ds.chunk.02.jsonl.shard_00.arrow"
    write_shard(truncated, [meta_row(30 + i, f"t{i}") for i in range(12)])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    m = import_preprocessed(reg, MetaImportConfig(**{**cfg, "name": "imp2"}))
    assert m.stats.quarantined == 2
    q = [json.loads(line) for line in iter_lines(reg.store, reg.part_path(m, m.quarantine[0]))]
    assert [(r["line"], r["reason"]) for r in q] == [
        (1, "6 entropies for 5 bytes (Meta's layout has n + 2)"), (2, "no text")]
    assert q[0]["source"].endswith("ds.chunk.01.jsonl.shard_00.arrow") and json.loads(q[0]["raw"])["sample_id"] == "20"
    (damaged,) = m.stats.damaged_files
    assert damaged["file"].endswith("ds.chunk.02.jsonl.shard_00.arrow") and damaged["lines_read"] in (4, 8)
    ids = [r["id"] for r in our_rows(reg, "imp2")]
    assert ids[:12] == [str(i) for i in range(10)] + ["22", "3#ds.chunk.01.jsonl.shard_00.arrow:4"]
    assert len(ids) == 12 + damaged["lines_read"] and m.stats.duplicate_ids == 1
    assert verify(reg, m) == []

    # Not Meta's columns at all: a clear refusal, not a quarantine of every row.
    other = tmp_path / "other"
    write_shard(other / "x.shard_0.arrow", [{"a": 1}], schema=pa.schema([pa.field("a", pa.int64())]))
    with pytest.raises(MetaLayoutError, match="not a Meta preprocessed shard"):
        import_preprocessed(reg, MetaImportConfig(source=str(other), name="imp3", rule=PatchRule(threshold=1.0)))
    with pytest.raises(MetaLayoutError, match="no \\*.shard_\\*.arrow files"):
        import_preprocessed(reg, MetaImportConfig(source=str(tmp_path / "nothing"), name="imp4", rule=PatchRule(threshold=1.0)))


def test_import_with_workers_is_the_one_at_a_time_import(tmp_path):
    """Shards convert concurrently, yet ids are decided in shard order: a shard that repeats an
    id of one converting beside it is converted again after it, so any number of workers writes
    the same bytes. Shards 0-2 start together (3 workers), so shards 1 and 2 take that path."""
    folder = tmp_path / "pre" / "ds" / "m"
    spans = [range(0, 10), range(5, 15), range(14, 20), range(30, 36)]  # 5-9 and 14 repeat across shards
    for k, ids in enumerate(spans):
        rows = [meta_row(i, f"doc {i} of shard {k}") for i in ids] + ([meta_row(31, "again in shard 3")] if k == 3 else [])
        write_shard(folder / f"ds.chunk.00.jsonl.shard_{k:02d}.arrow", rows)
    made = {}
    for workers in (1, 3):
        reg = Registry(Store.open(str(tmp_path / f"store-{workers}")))
        made[workers] = import_preprocessed(reg, MetaImportConfig(
            source=str(tmp_path / "pre"), name="imp", rule=PatchRule(threshold=1.0), workers=workers))
        ids = [r["id"] for r in our_rows(reg, "imp")]
        assert len(ids) == len(set(ids)) == 10 + 10 + 6 + 7
        assert "5#ds.chunk.00.jsonl.shard_01.arrow:1" in ids and "31#ds.chunk.00.jsonl.shard_03.arrow:7" in ids
    one, many = made[1], made[3]
    assert one.job_id == many.job_id  # workers is an execution field
    assert [(p.path, p.sha256) for p in one.parts] == [(p.path, p.sha256) for p in many.parts]
    assert one.stats == many.stats and one.stats.duplicate_ids == 5 + 1 + 1


# --- Meta's own loader, where its source is at hand ------------------------------------------

META_SOURCE = Path(os.environ.get("BLT_META_SOURCE", "/work/ref/blt"))


@pytest.fixture
def bytelatent(monkeypatch):
    """Meta's bytelatent package from its source. Three imports it makes are stood in for, none of
    them used on this path: bytelatent.distributed (imports xformers, CUDA-only; the patcher takes
    get_local_rank from it for realtime patching), bytelatent.entropy_model (realtime patching) and
    jsonlines (reading JSONL in preprocessing)."""
    if not (META_SOURCE / "bytelatent" / "data" / "patcher.py").exists():
        pytest.skip(f"Meta's BLT source is not at {META_SOURCE} (set BLT_META_SOURCE)")
    stand_ins = {
        "bytelatent.distributed": {"get_local_rank": lambda: 0},
        "bytelatent.entropy_model": {"load_entropy_model": None},
        "jsonlines": {},
    }
    for name, attrs in stand_ins.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(META_SOURCE))
    from bytelatent.data.iterators.arrow_iterator import ArrowFileIterator
    from bytelatent.data.iterators.preprocess_iterator import PreprocessIterator
    from bytelatent.data.patcher import PatcherArgs
    from bytelatent.tokenizers.build_tokenizer import TokenizerArgs

    return types.SimpleNamespace(ArrowFileIterator=ArrowFileIterator, PreprocessIterator=PreprocessIterator,
                                 PatcherArgs=PatcherArgs, TokenizerArgs=TokenizerArgs)


def class_fields(path: Path, name: str) -> set[str]:
    import ast

    (cls,) = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef) and n.name == name]
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


@pytest.mark.parametrize("max_len", [None, 5])
def test_meta_loader_reads_the_export_and_patches_like_us(local_store_url, tmp_path, bytelatent, max_len):
    reg = Registry(Store.open(local_store_url))
    docs = make_docs(40, seed=4)
    commit_dataset(reg, "corpus", docs, max_len=max_len)
    out = tmp_path / "export"
    export_meta(reg, MetaExportConfig(patches="corpus", out=str(out), chunks=2, shard_bytes=1200, batch_rows=3))
    cfg = yaml.safe_load((out / CONFIG_FILE).read_text())["data"]
    # DataloaderArgs forbids unknown keys; its module needs CUDA-only imports, so read its fields.
    assert set(cfg) <= class_fields(META_SOURCE / "bytelatent" / "args.py", "DataloaderArgs")
    assert set(cfg["patcher_args"]) <= set(bytelatent.PatcherArgs.model_fields)
    ours = {r["id"]: r for r in our_rows(reg, "corpus")}
    seen = []
    chunks = sorted((out / "data" / "corpus").glob("*.chunk.*.jsonl"))  # args.py: find_and_sanitize_chunks
    assert len(chunks) == 2
    for chunk in chunks:
        arrow = bytelatent.ArrowFileIterator(
            file_path=str(chunk), worker_id=0, num_workers=1, preprocess_dir=cfg["preprocess_dir"],
            entropy_model_name=cfg["entropy_model_name"], arrow_batch_size=7, file_format=cfg["file_format"],
        )
        pre = bytelatent.PreprocessIterator(
            arrow, patcher_args=bytelatent.PatcherArgs(**cfg["patcher_args"]),
            tokenizer_args=bytelatent.TokenizerArgs(**cfg["tokenizer_args"]),
        )
        for example in pre.create_iter():
            mine = ours[example.sample_id]
            n = len(mine["text"].encode())
            assert example.text == mine["text"] and len(example.tokens) == n + 2
            body = list(mine["patch_lengths"])
            eos_own = n == 0 or mine["eos_entropy"] > THRESHOLD
            expected = [1] + (body + [1] if eos_own else body[:-1] + [body[-1] + 1])
            if max_len and expected[-1] > max_len:
                expected[-1:] = [max_len, 1]
            assert example.patch_lengths == expected, (example.sample_id, example.patch_lengths, expected)
            seen.append(example.sample_id)
    assert seen == list(ours)


def test_meta_loader_refuses_a_shard_without_marker(local_store_url, tmp_path, bytelatent):
    """The markers matter: Meta's own reader refuses a shard without one (so export writes them)."""
    reg = Registry(Store.open(local_store_url))
    commit_dataset(reg, "corpus", make_docs(10, seed=5))
    out = tmp_path / "export"
    export_meta(reg, MetaExportConfig(patches="corpus", out=str(out)))
    (marker,) = out.rglob("*.complete")
    marker.unlink()
    cfg = yaml.safe_load((out / CONFIG_FILE).read_text())["data"]
    with pytest.raises(ValueError, match="Missing .complete"):
        bytelatent.ArrowFileIterator(
            file_path=str(next((out / "data" / "corpus").glob("*.jsonl"))), worker_id=0, num_workers=1,
            preprocess_dir=cfg["preprocess_dir"], entropy_model_name=cfg["entropy_model_name"], arrow_batch_size=7,
        )
