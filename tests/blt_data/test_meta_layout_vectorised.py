"""The whole-column conversions of Meta's layout (issue 12, throughput) against the per-row
code they replaced, kept here as the oracle, on random batches: empty documents, multi-byte
UTF-8, documents longer than Meta's 8192-token rows, and the rows import must quarantine."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from blt_data.meta_layout import (
    META_SCHEMA, from_meta_batch, meta_patch_lengths, meta_threshold, to_meta_entropies, with_bos_eos,
)
from blt_data.patching import PatchedBatch, PatchRule, patch_lengths_batch
from tests.blt_data.test_meta_layout import meta_rule

PIECES = ["a", "é", "€", "𝄞", " ", "\n", "xyz"]  # 1-4 UTF-8 bytes


def _from_meta_batch_before(batch: pa.RecordBatch):
    """from_meta_batch as first written (per-row index arrays, a Python id list)."""
    text = batch.column("text").cast(pa.large_string())
    sample_id = batch.column("sample_id")
    ent = batch.column("entropies")
    n = pc.binary_length(text).to_numpy(zero_copy_only=False)
    counts = ent.value_lengths().to_numpy(zero_copy_only=False)
    flat_all = ent.flatten().to_numpy(zero_copy_only=False).astype(np.float16)
    bad = []
    ok = np.ones(batch.num_rows, dtype=bool)
    for column, reason in ((text, "no text"), (sample_id, "no sample_id"), (ent, "no entropies")):
        if column.null_count:
            for i in np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False) & ok):
                bad.append((int(i), reason))
            ok &= ~column.is_null().to_numpy(zero_copy_only=False)
    n = np.nan_to_num(n.astype(np.float64), nan=-1).astype(np.int64)
    counts = np.nan_to_num(counts.astype(np.float64), nan=-1).astype(np.int64)
    wrong = ok & (counts != n + 2)
    for i in np.flatnonzero(wrong):
        bad.append((int(i), f"{counts[i]} entropies for {n[i]} bytes (Meta's layout has n + 2)"))
    ok &= ~wrong
    starts = np.zeros(batch.num_rows + 1, dtype=np.int64)
    np.cumsum(np.where(counts > 0, counts, 0), out=starts[1:])
    nan_rows = []
    if np.isnan(flat_all).any():
        row_of = np.repeat(np.arange(batch.num_rows), np.where(counts > 0, counts, 0))
        pos = np.arange(flat_all.size) - starts[row_of]
        used = np.isnan(flat_all) & (pos <= n[row_of])
        nan_rows = sorted(set(row_of[used].tolist()) & set(np.flatnonzero(ok).tolist()))
    for i in nan_rows:
        bad.append((i, "entropies contain NaN"))
        ok[i] = False
    bad.sort()
    keep = np.flatnonzero(ok)
    good_n = n[keep]
    row_of = np.repeat(np.arange(keep.size), good_n)
    within = np.arange(int(good_n.sum())) - np.repeat(np.cumsum(good_n) - good_n, good_n)
    byte_values = flat_all[starts[keep][row_of] + within] if keep.size else np.zeros(0, np.float16)
    eos = flat_all[starts[keep] + good_n] if keep.size else np.zeros(0, np.float16)
    offsets = np.zeros(keep.size + 1, dtype=np.int32)
    np.cumsum(good_n, out=offsets[1:])
    keep_arr = pa.array(keep)
    return (keep, sample_id.take(keep_arr).cast(pa.string()).to_pylist(), text.take(keep_arr),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(byte_values, pa.float16())),
            pa.array(eos, pa.float16()), bad)


def random_batch(rng: np.random.Generator, rows: int, odd: bool) -> pa.RecordBatch:
    """Meta rows (n + 2 float16 values each); with ``odd``, some rows import must quarantine:
    nulls, wrong counts, NaN where it is read (value <= n) and where it is not (value n + 1)."""
    ids, texts, entropies = [], [], []
    for i in range(rows):
        kind = rng.integers(0, 6)
        length = 0 if kind == 0 else int(rng.integers(8193, 12000)) if kind == 1 else int(rng.integers(1, 200))
        text = "".join(rng.choice(PIECES, size=length)) if kind != 2 else "ascii " * length
        e = rng.gamma(2.0, 0.8, len(text.encode()) + 2).astype(np.float16)
        ids.append(f"doc-{i}")
        texts.append(text)
        entropies.append(e)
        if odd and rng.random() < 0.3:
            what = rng.integers(0, 6)
            if what == 0:
                texts[-1] = None
            elif what == 1:
                ids[-1] = None
            elif what == 2:
                entropies[-1] = None
            elif what == 3:
                entropies[-1] = e[: int(rng.integers(0, e.size))]
            elif what == 4:
                e[int(rng.integers(0, e.size - 1))] = np.nan  # read: the row is bad
            else:
                e[-1] = np.nan  # value n + 1, never read: the row is good
    schema = pa.schema([f.with_nullable(True) for f in META_SCHEMA])
    return pa.RecordBatch.from_arrays(
        [pa.array(ids, pa.string()), pa.array(texts, pa.string()),
         pa.array([None if e is None else e.tolist() for e in entropies], pa.list_(pa.float16()))],
        schema=schema,
    )


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("odd", [False, True])
def test_from_meta_batch_equals_the_per_row_conversion(seed, odd):
    rng = np.random.default_rng(seed)
    batch = random_batch(rng, int(rng.integers(0, 40)), odd)
    for piece in (batch, batch.slice(min(3, batch.num_rows))):  # a slice starts inside the buffers
        new = from_meta_batch(piece)
        keep, ids, text, entropies, eos, bad = _from_meta_batch_before(piece)
        assert new.rows.tolist() == keep.tolist()
        assert new.ids.to_pylist() == ids and new.ids.type == pa.string()
        assert new.text.equals(text)
        assert new.entropies.equals(entropies)
        assert new.eos_entropy.equals(eos)
        assert new.bad == bad


def _with_bos_eos_before(ours: PatchedBatch, eos_own_patch: np.ndarray, max_patch_length: int | None = None) -> PatchedBatch:
    """with_bos_eos as first written (a per-patch document index)."""
    num = ours.num_patches
    D = num.size
    last = np.zeros(D, dtype=np.int64)
    ends = np.cumsum(num) - 1
    has = num > 0
    last[has] = ours.patch_lengths[ends[has]]
    extra = np.asarray(eos_own_patch, dtype=bool) | ~has
    if max_patch_length is not None:
        extra |= last >= max_patch_length
    out_num = num + 1 + extra
    out_offsets = np.zeros(D + 1, dtype=np.int64)
    np.cumsum(out_num, out=out_offsets[1:])
    out = np.empty(int(out_offsets[-1]), dtype=np.int32)
    out[out_offsets[:-1]] = 1
    doc = np.repeat(np.arange(D), num)
    shift = np.cumsum(1 + extra) - extra
    out[np.arange(ours.patch_lengths.size) + shift[doc]] = ours.patch_lengths
    tail = out_offsets[1:] - 1
    out[tail[extra]] = 1
    out[tail[~extra]] += 1
    return PatchedBatch(out, out_num)


def random_documents(rng: np.random.Generator, docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte lengths (empty, short, longer than Meta's 8192-token rows) and float16 entropies,
    many of them on or next to the thresholds used below."""
    n = np.where(rng.random(docs) < 0.2, 0, rng.integers(1, 60, docs))
    n[rng.random(docs) < 0.05] = 9000
    grid = np.array([0.0, 0.5, 0.9995, 1.0, 1.0009765625, 2.0, 3.5], np.float16)
    e = np.where(rng.random(int(n.sum())) < 0.5, rng.choice(grid, int(n.sum())), rng.gamma(2.0, 0.8, int(n.sum()))).astype(np.float16)
    return n, e


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_len", [None, 1, 3])
def test_meta_patch_lengths_and_with_bos_eos_equal_the_per_document_rule(seed, max_len):
    rng = np.random.default_rng(seed)
    n, e = random_documents(rng, int(rng.integers(1, 30)))
    eos = rng.choice(np.array([0.5, 1.0, 1.0009765625, 3.0], np.float16), n.size)
    for threshold, monotonic in ((1.0, False), (1.0005, False), (0.0, False), (0.5, True)):
        values, offsets = to_meta_entropies(n, e, eos)
        t_meta = meta_threshold(threshold) if not monotonic else float(np.float32(threshold))
        meta = meta_patch_lengths(values, n + 2, t_meta, monotonic, max_len)
        want = [meta_rule(values[a:b], t_meta, max_len, monotonic) for a, b in zip(offsets[:-1], offsets[1:])]
        assert [x.tolist() for x in meta.split()] == want
        ours = patch_lengths_batch(n, e, PatchRule(scheme="monotonic" if monotonic else "entropy", threshold=threshold,
                                                   max_patch_length=max_len))
        eos_own = rng.random(n.size) < 0.5
        new, before = with_bos_eos(ours, eos_own, max_len), _with_bos_eos_before(ours, eos_own, max_len)
        assert np.array_equal(new.patch_lengths, before.patch_lengths) and np.array_equal(new.num_patches, before.num_patches)
