"""The trainer's reader on a real store (local folder and loopback S3): packing invariants, exactly
once per epoch at several world sizes, bitwise resume at the same world size, resume at another
world size without a repeated or skipped byte, epochs, the val pass, and clear refusals.

Data: 90 train documents (0 to 300 bytes, ASCII and multi-byte UTF-8, some longer than a row) in
3 parts, 12 val documents; blocks of 4 documents, rows of 64 tokens, batches of 2 rows, so one
epoch is about 70 batches and every edge case (patches and documents across row and batch edges,
empty documents) occurs many times.
"""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from blt_data.patches import (
    arrow_schema_summary, build_table, entropies_array, part_name, write_part,
)
from blt_data.patching import PatchRule, patch_lengths_arrow
from blt_data.reader import (
    IGNORE_INDEX, Reader, ReaderConfig, ReaderError, build_val_reader, empty_batch, epoch_order, merge_states,
)
from blt_data import registry as registry_module
from blt_data.registry import Manifest, Registry
from blt_data.stats import DatasetStats
from blt_data.storage import Store

T, B, BLOCK = 64, 2, 4
PATCH = PatchRule(scheme="space")  # long runs without spaces make patches longer than a row


def make_texts(n: int, seed: int, prefix: str) -> dict[str, str]:
    rng = random.Random(seed)
    words = ["the", "byte", "latent", "transformer", "é", "😀", "patch", "x" * 90, "", "日本語"]
    out = {}
    for i in range(n):
        k = rng.choice([0, 1, 3, 8, 20, 40])
        out[f"{prefix}{i:03d}"] = " ".join(rng.choice(words) for _ in range(k))[:300]
    return out


TRAIN = make_texts(90, 1, "t")
VAL = make_texts(12, 2, "v")


def commit_patches(reg: Registry, name: str = "pp", splits: dict[str, dict[str, str]] | None = None,
                   parts: int = 3, job: str = "job1") -> Manifest:
    """A patches dataset made with the patch job's own writers (write_part, DatasetStats, commit)."""
    splits = splits if splits is not None else {"train": TRAIN, "val": VAL}
    infos, stats, index = [], DatasetStats(), 0
    for split, docs in splits.items():
        ids = list(docs)
        for chunk in np.array_split(np.arange(len(ids)), parts if split == "train" else 1):
            chunk_ids = [ids[i] for i in chunk]
            text = pa.array([docs[i] for i in chunk_ids], pa.large_string())
            entropies = entropies_array([np.zeros(len(docs[i].encode()), np.float16) for i in chunk_ids])
            lengths = patch_lengths_arrow(text, None, PATCH)
            table = build_table(chunk_ids, text, lengths, entropies)
            infos.append(write_part(
                reg.store, f"{reg.job_dir(name, job)}/{part_name(index)}", f"_jobs/{job}/{part_name(index)}", table,
                dataset=name, job_id=job, split=split,
            ))
            stats = stats + DatasetStats.of(lengths, None)
            index += 1
    return reg.commit(Manifest(
        name=name, kind="patches", job_id=job, arrow_schema=arrow_schema_summary(True), parts=infos,
        stats=stats.model_copy(update={"splits": {s: len(d) for s, d in splits.items()}}),
    ))


def config(**overrides) -> ReaderConfig:
    return ReaderConfig(**{"dataset": "pp", "seq_len": T, "batch_size": B, "block_documents": BLOCK, "prefetch": 3, **overrides})


def take(reader: Reader, n: int | None = None) -> list[tuple[dict, dict]]:
    out = []
    for item in reader:
        out.append(item)
        if n is not None and len(out) == n:
            break
    return out


def doc_tokens(text: str) -> list[int]:
    return [1, *(b + 4 for b in text.encode()), 2]


def doc_patches(text: str) -> list[int]:
    lengths = patch_lengths_arrow(pa.array([text], pa.large_string()), None, PATCH)[0].as_py()
    return [1, *lengths, 1]


def stream(batches) -> np.ndarray:
    """A rank's token stream: its rows end to end."""
    if not batches:
        return np.zeros(0, np.int64)
    return np.concatenate([b["tokens"].reshape(-1).numpy() for b, _ in batches])


def segments(tokens: np.ndarray) -> list[list[int]]:
    """The stream cut after every EOS (pad dropped): whole documents, and pieces of documents cut
    by a checkpoint (a prefix ends the stream, a continuation does not start with BOS)."""
    tokens = tokens[tokens != 0].tolist()
    out, cur = [], []
    for t in tokens:
        cur.append(t)
        if t == 2:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def documents(batches) -> list[str]:
    return [d for b, _ in batches for d in b["documents"]]


def check_stream(batches, texts: dict[str, str]) -> tuple[list[int] | None, list[list[int]]]:
    """Whole documents are exactly BOS, bytes, EOS of the document named in `documents`, in order.
    Returns the unfinished prefix at the end (or None) and the continuations (pieces without BOS)."""
    ids = iter(documents(batches))
    prefix, continuations = None, []
    segs = segments(stream(batches))
    for i, seg in enumerate(segs):
        if seg[0] != 1:
            continuations.append(seg)
            continue
        doc = next(ids)
        if i == len(segs) - 1 and seg[-1] != 2:
            prefix = (doc, seg)
            assert doc_tokens(texts[doc])[: len(seg)] == seg
        else:
            assert seg == doc_tokens(texts[doc]), doc
    assert next(ids, None) is None
    return prefix, continuations


def assert_same(a: list[tuple[dict, dict]], b: list[tuple[dict, dict]], states: bool = True) -> None:
    assert len(a) == len(b)
    for (x, sx), (y, sy) in zip(a, b):
        assert sx == sy or not states
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


@pytest.fixture
def reg(store_url) -> Registry:
    registry = Registry(Store.open(store_url))
    commit_patches(registry)
    return registry


@pytest.fixture
def local_reg(local_store_url) -> Registry:
    registry = Registry(Store.open(local_store_url))
    commit_patches(registry)
    return registry


def test_packing_round_trips_bytes_patches_targets_and_segments(reg):
    batches = take(Reader(config(epochs=1), reg))
    assert len(batches) > 30
    # Every row full except the end of the pass; only the last row may end with pad.
    for i, (b, _) in enumerate(batches):
        rows = b["tokens"].shape[0]
        assert b["tokens"].shape == b["targets"].shape == b["doc_ids"].shape == (rows, T)
        assert (b["tokens"].dtype, b["targets"].dtype, b["patch_lengths"].dtype, b["doc_ids"].dtype) == (
            torch.int64, torch.int64, torch.int32, torch.int32)
        assert rows == B or i == len(batches) - 1
    flat = stream(batches)
    pad = np.flatnonzero(flat == 0)
    assert pad.size == 0 or (pad[0] >= len(flat) - T and np.all(flat[pad[0]:] == 0))

    prefix, continuations = check_stream(batches, TRAIN)
    assert prefix is None and continuations == []
    assert sorted(documents(batches)) == sorted(TRAIN)

    # Expected patches: BOS, the stored patches, EOS per document, cut at every row edge; a pad tail is one patch.
    order = documents(batches)
    real = sum(len(t.encode()) + 2 for t in TRAIN.values())
    ends = np.cumsum([p for d in order for p in doc_patches(TRAIN[d])])
    assert ends[-1] == real
    cuts = np.unique(np.concatenate([ends, np.arange(T, len(flat) + 1, T), [len(flat)]]))
    starts = np.concatenate([[0], cuts[:-1]])
    row_of = starts // T
    got_rows = [r for b, _ in batches for r in b["patch_lengths"].numpy()]
    for r, row in enumerate(got_rows):
        nonzero = row[row > 0]
        assert row.sum() == T and np.all(row[len(nonzero):] == 0)
        assert nonzero.tolist() == (cuts - starts)[row_of == r].tolist()
    # BOS and EOS are patches of their own.
    boundaries = set(cuts.tolist()) | {0}
    for p in np.flatnonzero((flat == 1) | (flat == 2)):
        assert p in boundaries and p + 1 in boundaries

    # Targets: the next token of the stream (the BOS after an EOS too: Meta's convention),
    # ignored on pad and at the end.
    targets = np.concatenate([b["targets"].reshape(-1).numpy() for b, _ in batches])
    expected = np.append(flat[1:], 0).astype(np.int64)
    expected[(expected == 0) | (flat == 0)] = IGNORE_INDEX
    assert (expected == 1).sum() > 0 and np.all(flat[np.flatnonzero(expected == 1)] == 2)  # BOS only after EOS
    assert np.array_equal(targets, expected)

    # doc_ids: a new segment at each BOS along the row, and at the pad tail.
    for b, _ in batches:
        for toks, ids in zip(b["tokens"].numpy(), b["doc_ids"].numpy()):
            seg, want = 0, []
            for i, t in enumerate(toks):
                if i and (t == 1 or (t == 0 and toks[i - 1] != 0)):
                    seg += 1
                want.append(seg)
            assert ids.tolist() == want

    assert sum(b["n_bytes"] for b, _ in batches) == sum(len(t.encode()) for t in TRAIN.values())
    assert sum(b["n_patches"] for b, _ in batches) == int(np.count_nonzero(starts < real))
    # Prefetching changes nothing: same batches, same states.
    assert_same(batches, take(Reader(config(epochs=1, prefetch=0, read_ahead=1), reg)))


@pytest.mark.parametrize("world", [2, 3])
def test_every_document_exactly_once_per_epoch(reg, world):
    manifest = reg.resolve("pp")
    order = epoch_order(manifest, "train", 0, 0, BLOCK)
    parts = manifest.parts_of("train")
    seen = []
    for rank in range(world):
        batches = take(Reader(config(epochs=1), reg, rank, world))
        check_stream(batches, TRAIN)
        # A rank reads only its stride of the epoch's blocks.
        mine = [b for b in order[rank::world]]
        part_ids = {p.path: list(i) for p, i in zip(parts, np.array_split(np.array(sorted(TRAIN)), 3))}
        assert documents(batches) == [part_ids[parts[b.part].path][r] for b in mine for r in range(b.start, b.stop)]
        seen += documents(batches)
    assert sorted(seen) == sorted(TRAIN)


def test_resume_same_world_size_is_bitwise(reg):
    world, steps = 2, 45  # ~35 batches per rank and epoch: the resumed runs cross into epoch 1
    full = [take(Reader(config(), reg, rank, world), steps) for rank in range(world)]
    assert {c["epoch"] for _, s in full[0] for c in s["cursors"]} == {0, 1}
    for rank in range(world):
        for n in (1, 17, 33):
            state = json.loads(json.dumps(full[rank][n - 1][1]))
            resumed = take(Reader(config(), reg, rank, world, state=state), steps - n)
            assert_same(resumed, full[rank][n:])
    # A merged state resumes a run of the same size exactly too, also when the ranks are in
    # different epochs (after 37 batches rank 0 is in epoch 1, rank 1 in epoch 0).
    for n in (17, 37):
        merged = merge_states([full[rank][n - 1][1] for rank in range(world)])
        for rank in range(world):
            resumed = take(Reader(config(), reg, rank, world, state=merged), steps - n)
            # The same batches; a lagging rank's state may list its next epoch's shard explicitly.
            assert_same(resumed, full[rank][n:], states=False)


def run_phases(reg: Registry, worlds: list[int], steps: list[int], epochs: int):
    """Read `steps[i]` batches per rank at world size `worlds[i]`, merging states between phases;
    the last phase reads to the end. Returns every rank's batches per phase and the merged states."""
    state, phases, merged_states = None, [], []
    for i, world in enumerate(worlds):
        last = i == len(worlds) - 1
        readers = [Reader(config(epochs=epochs), reg, r, world, state=state) for r in range(world)]
        per_rank = [take(reader, None if last else steps[i]) for reader in readers]
        phases.append(per_rank)
        if not last:
            # A rank with nothing left in a finite pass yields no batch: its state is where it started.
            states = [b[-1][1] if b else reader.start_state for b, reader in zip(per_rank, readers)]
            state = json.loads(json.dumps(merge_states(states)))
            merged_states.append(state)
    return phases, merged_states


def assert_every_byte_once(phases, texts: dict[str, str], epochs: int) -> None:
    """Each document's BOS is read `epochs` times in all, and for every document cut by a world
    size change, the prefix read before it + the continuation read after it is the document."""
    seen = [d for phase in phases for batches in phase for d in documents(batches)]
    assert sorted(seen) == sorted(list(texts) * epochs)
    prefixes, continuations = [], []
    for phase in phases:
        for batches in phase:
            prefix, conts = check_stream(batches, texts)
            prefixes += [prefix] if prefix else []
            continuations += conts
    assert len(prefixes) == len(continuations) >= 1
    for doc, head in prefixes:
        matches = [c for c in continuations if head + c == doc_tokens(texts[doc])]
        assert len(matches) == 1, doc
        continuations.remove(matches[0])


@pytest.mark.parametrize("worlds,steps", [([2, 3], [11]), ([2, 1], [13]), ([2, 3, 2], [9, 7])])
def test_resume_at_another_world_size_repeats_and_skips_nothing(reg, worlds, steps):
    phases, merged = run_phases(reg, worlds, steps, epochs=1)
    assert any(c["offset"] > 0 for m in merged for c in m["cursors"])  # a document was cut by a checkpoint
    assert_every_byte_once(phases, TRAIN, epochs=1)


def test_world_size_change_with_ranks_in_different_epochs(reg):
    # Blocks differ in bytes: after 37 batches rank 0 is inside epoch 1 and rank 1 still in epoch 0.
    phases, merged = run_phases(reg, [2, 3], [37], epochs=2)
    cursors = {(c["epoch"], c["shards"], c["shard"]): c for c in merged[0]["cursors"]}
    assert sorted(cursors) == [(0, 2, 1), (1, 2, 0), (1, 2, 1)] and merged[0]["next_epoch"] == 2
    assert cursors[(0, 2, 1)]["offset"] > 0 and cursors[(1, 2, 0)]["offset"] > 0
    assert cursors[(1, 2, 1)]["document"] == cursors[(1, 2, 1)]["offset"] == 0  # rank 1's epoch 1, not started
    assert_every_byte_once(phases, TRAIN, epochs=2)


def test_epochs_are_reshuffled_and_each_reads_everything_once(local_reg):
    manifest = local_reg.resolve("pp")
    assert epoch_order(manifest, "train", 0, 0, BLOCK) == epoch_order(manifest, "train", 0, 0, BLOCK)
    assert epoch_order(manifest, "train", 0, 0, BLOCK) != epoch_order(manifest, "train", 0, 1, BLOCK)
    assert epoch_order(manifest, "train", 0, 0, BLOCK) != epoch_order(manifest, "train", 1, 0, BLOCK)

    docs = documents(take(Reader(config(epochs=2), local_reg)))
    first, second = docs[: len(TRAIN)], docs[len(TRAIN):]
    assert sorted(first) == sorted(second) == sorted(TRAIN)
    assert first != second
    both = [d for rank in range(2) for d in documents(take(Reader(config(epochs=2), local_reg, rank, 2)))]
    assert sorted(both) == sorted(list(TRAIN) * 2)


@pytest.mark.parametrize("world", [1, 2])
def test_val_reader_is_one_sharded_pass(local_reg, world):
    seen = []
    for rank in range(world):
        batches = take(build_val_reader(config(), local_reg, rank, world))
        check_stream(batches, VAL)
        seen += documents(batches)
    assert sorted(seen) == sorted(VAL)


def test_empty_batch_is_all_ignored():
    b = empty_batch(B, T)
    assert b["tokens"].shape == (B, T) and bool((b["targets"] == IGNORE_INDEX).all())
    assert b["patch_lengths"].sum(dim=1).tolist() == [T] * B and b["documents"] == []


def test_refusals_are_clear(local_reg):
    reg = local_reg
    reg.commit(Manifest(name="docs", kind="documents", job_id="d"))
    with pytest.raises(ReaderError, match="docs@v1 is a documents dataset; the reader needs a patches dataset"):
        Reader(config(dataset="docs"), reg)
    with pytest.raises(ReaderError, match="no dataset named 'nope'"):
        Reader(config(dataset="nope"), reg)
    with pytest.raises(ReaderError, match=r"pp@v1 has no documents in split 'test' \(documents per split: train=90, val=12\)"):
        Reader(config(split="test"), reg)

    # A manifest of a format newer than this code's (the registry refuses it, the reader says so).
    future = reg.resolve("pp").model_copy(update={"name": "future", "format_version": 3})
    reg.store.write_bytes(reg.manifest_path("future", 1), future.model_dump_json().encode())
    with pytest.raises(ReaderError, match="future@v1: manifest format version 3 is newer than this blt-data"):
        Reader(config(dataset="future"), reg)

    # A part written in another patches format version.
    manifest = reg.resolve("pp")
    rel = reg.part_path(manifest, manifest.parts[0])
    table = pq.read_table(reg.store.open_input(rel))
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    other = commit_patches(reg, name="odd", job="job2")
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata({**meta, "blt.format_version": "99", "blt.dataset": "odd", "blt.job_id": "job2"}), sink)
    data = sink.getvalue().to_pybytes()
    reg.store.write_bytes(reg.part_path(other, other.parts[0]), data)
    # The manifest records the new part's size and hash, as its writer would have (the reader checks the size).
    fixed = other.parts[0].model_copy(update={"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    other = other.model_copy(update={"parts": [fixed, *other.parts[1:]]})
    reg.store.write_bytes(reg.manifest_path("odd", other.version), other.model_dump_json().encode())
    with pytest.raises(ReaderError, match="is format 'patches' version '99'; this reader reads 'patches' version 1"):
        take(Reader(config(dataset="odd", block_documents=1000), reg))

    state = take(Reader(config(), reg), 3)[-1][1]
    with pytest.raises(ReaderError, match="saved with seed=0, this reader has seed=1"):
        Reader(config(seed=1), reg, state=state)
    commit_patches(reg, job="job3")  # pp@v2: a state of v1 does not resume it
    with pytest.raises(ReaderError, match=r"saved with dataset='pp@v1:job1', this reader has dataset='pp@v2:job3'"):
        Reader(config(), reg, state=state)
    with pytest.raises(ReaderError, match="reader state version 7, this reader knows 1"):
        Reader(config(dataset="pp@v1"), reg, state={**state, "version": 7})
    with pytest.raises(ReaderError, match="state of rank 0 of 1 given to rank 1 of 2; to change the world size pass merge_states"):
        Reader(config(dataset="pp@v1"), reg, 1, 2, state=state)
    with pytest.raises(ReaderError, match=r"need one state per rank 0..1, got ranks \[0\]"):
        merge_states([take(Reader(config(dataset="pp@v1"), reg, 0, 2), 1)[-1][1]])
    with pytest.raises(ReaderError, match="malformed reader state"):
        Reader(config(dataset="pp@v1"), reg, state={**state, "cursors": "?"})
    with pytest.raises(ReaderError, match="every rank needs a block per epoch"):
        Reader(config(block_documents=100), reg, 0, 4)


def test_format_1_order_is_the_one_saved_states_were_made_with(local_reg):
    """Format 1 keeps the blake2b-of-path block order, so states saved before format 2 resume."""
    manifest = local_reg.resolve("pp")
    assert manifest.format_version == 1
    parts = manifest.parts_of("train")
    blocks = [(i, a, min(a + BLOCK, p.rows)) for i, p in enumerate(parts) for a in range(0, p.rows, BLOCK)]
    key = f"{manifest.id}|train|0|{BLOCK}".encode()
    for epoch in (0, 1):
        expected = sorted(blocks, key=lambda b: hashlib.blake2b(
            key + f"|{epoch}|{parts[b[0]].path}|{b[1]}".encode(), digest_size=16).digest())
        assert [(b.part, b.start, b.stop) for b in epoch_order(manifest, "train", 0, epoch, BLOCK)] == expected


@pytest.mark.parametrize("worlds,steps", [([2, 3], [11])])
def test_format_2_dataset_reads_every_byte_once_across_a_world_size_change(local_store_url, monkeypatch, worlds, steps):
    """A manifest with a part list (format 2; its block order is computed on columns)."""
    monkeypatch.setattr(registry_module, "INLINE_PARTS", 2)
    reg = Registry(Store.open(local_store_url))
    manifest = commit_patches(reg)
    assert manifest.format_version == 2 and reg.resolve("pp").parts_file is not None
    orders = [epoch_order(reg.resolve("pp"), "train", 0, e, BLOCK) for e in (0, 1)]
    assert orders[0] != orders[1] and sorted(orders[0], key=lambda b: (b.part, b.start)) == sorted(orders[1], key=lambda b: (b.part, b.start))
    phases, merged = run_phases(reg, worlds, steps, epochs=1)
    assert any(c["offset"] > 0 for m in merged for c in m["cursors"])
    assert_every_byte_once(phases, TRAIN, epochs=1)
