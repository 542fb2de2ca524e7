"""Global, uniform, seeded external shuffle of a documents dataset (terashuf-style).

    input parts ──pass 1──▶ _jobs/<job>/_runs/run-NNNNNN.jsonl.zst   (≤ memory_bytes each, shuffled)
                ──pass 2──▶ merge: draw run r with probability remaining_r / remaining_total
                            first val_docs lines → val/part-*, the rest → chunk-NNNNNN/part-*

Pass 1 cuts the input, in manifest order, into runs of at most ``memory_bytes`` of lines and
shuffles each run in memory. Pass 2 interleaves the runs uniformly at random; a uniformly shuffled
run interleaved uniformly with the others makes every permutation of the whole input equally
likely. Lines are moved as raw bytes, never parsed.

Invariant: the output is a pure function of the job id (input manifest, seed, num_chunks,
val_docs, memory_bytes, target_part_bytes; numpy's generator streams), so a rerun writes
byte-identical parts; every input line appears exactly once. The job keeps at most
``memory_bytes`` of documents in RAM, except that a single document larger than that becomes a
run of its own (it has to be held whole to be moved at all).

Length: the two passes of one algorithm and their resumable records.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import IO, Iterator, NamedTuple

import numpy as np
import zstandard
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from blt_data.documents import DEFAULT_PART_BYTES, PART_EXT, PartWriter, part_name
from blt_data.jobs import output_fields
from blt_data.registry import Manifest, PartInfo, Registry, job_hash
from blt_data.storage import Store

log = logging.getLogger(__name__)

# Runs are merged in one pass with every run file open at once: this bounds open files and, on
# S3, the read-ahead buffers (one per run). 10 TB with 16 GB of memory is ~640 runs.
MAX_RUNS = 1000
READ_BYTES = 4 << 20  # decompressed bytes per read while streaming an input part
WRITE_BLOCK_BYTES = 4 << 20  # bytes joined per zstd write
ZSTD_THREADS = 2  # compression workers; they overlap reading and merging in the calling thread
# Runs are temporary: level 1 compresses ~1.5x faster than the parts' level 3, ~8% larger.
RUN_ZSTD_LEVEL = 1
# A run's line offsets and permutation cost about this much per line (int64 arrays); it is
# charged against memory_bytes so that runs of many tiny documents stay inside the budget.
LINE_INDEX_BYTES = 32
_NEWLINE = 10
# Purposes mixed into the seed so each random stream is independent of the others.
_RUN_STREAM, _MERGE_STREAM = 1, 2
_CHUNK_RE = re.compile(r"(?:^|/)chunk-(\d+)/")


class ShuffleConfig(BaseModel):
    """Every field changes the bytes written, so all of them go into the job id."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = Field(0, ge=0, description="seed of every random draw (numpy Generator)")
    num_chunks: int = Field(1, ge=1, description="train chunks of nearly equal document counts")
    val_docs: int = Field(0, ge=0, description="documents taken first from the shuffled order for the val split")
    # In terashuf the run size shapes the permutation (it decides which lines share a run), so
    # memory is a result field here, unlike worker counts elsewhere: changing it is a new job.
    memory_bytes: int = Field(1 << 30, ge=1, description="most bytes of documents held in RAM (one run)")
    target_part_bytes: int = Field(
        DEFAULT_PART_BYTES, ge=1, description="uncompressed bytes after which a part is closed"
    )


class RunsIndex(BaseModel):
    """``_runs/runs.json``: written after the last run, it marks pass 1 done for a rerun.

    Run paths are store-relative (runs belong to no manifest).
    """

    model_config = ConfigDict(extra="forbid")
    runs: list[PartInfo]
    line_bytes: list[int] = Field(description="uncompressed bytes of each run (lines with newlines)")


def shuffle_documents(
    registry: Registry,
    ref: str,
    name: str,
    *,
    num_chunks: int,
    seed: int,
    memory_bytes: int,
    val_docs: int,
    target_part_bytes: int = DEFAULT_PART_BYTES,
    progress: bool = False,
) -> Manifest:
    """Shuffle the documents dataset ``ref`` into a new version of ``name``; returns its manifest.

    A committed version made by the same job is returned as it is, without redoing anything.
    """
    cfg = ShuffleConfig(
        seed=seed,
        num_chunks=num_chunks,
        val_docs=val_docs,
        memory_bytes=memory_bytes,
        target_part_bytes=target_part_bytes,
    )
    source = registry.resolve(ref, kind="documents")
    job_id = job_hash({"step": "shuffle", "input": source.id, **output_fields(cfg)})
    done = registry.find_job(name, job_id)
    if done is not None:
        log.info("shuffle %s → %s: reusing %s (job %s)", source.ref, name, done.ref, job_id)
        return done
    num_docs = sum(p.rows for p in source.parts)
    _check_plan(source, cfg, num_docs)

    store = registry.store
    job_dir = registry.job_dir(name, job_id)
    runs_dir = f"{job_dir}/_runs"
    index = _load_runs_index(store, runs_dir)
    if index is None:
        index = _write_runs(registry, source, runs_dir, cfg, progress)
    else:
        log.info("shuffle %s: pass 1 already done (%d runs), merging", source.ref, len(index.runs))
    if sum(r.rows for r in index.runs) != num_docs:
        raise ValueError(
            f"{source.ref}: read {sum(r.rows for r in index.runs)} lines but its manifest lists "
            f"{num_docs} documents; run `registry verify` on it"
        )

    num_train = num_docs - cfg.val_docs
    # The merged order is cut into val first, then chunk 0, 1, ... (sizes differ by at most one).
    segments = [_Segment("val", "val", cfg.val_docs)]
    segments += [
        _Segment(f"chunk-{c:06d}", "train", (c + 1) * num_train // cfg.num_chunks - c * num_train // cfg.num_chunks)
        for c in range(cfg.num_chunks)
    ]
    sink = _OutputSink(store, job_dir, f"_jobs/{job_id}", segments, cfg.target_part_bytes)
    with _progress(progress, f"shuffle merge {len(index.runs)} runs", sum(index.line_bytes)) as bar:
        for block, ends in _merge_runs(store, index, cfg):
            sink.write(block, ends)
            bar.update(len(block))
            bar.set_postfix(docs=sink.rows, refresh=False)
    parts = sink.close()
    # Train chunks in chunk order, then val (the merged order starts with val).
    parts = [p for p in parts if p.split == "train"] + [p for p in parts if p.split == "val"]

    manifest = registry.commit(
        Manifest(
            name=name,
            kind="documents",
            job_id=job_id,
            parents=[source.ref],
            params={
                "step": "shuffle",
                **cfg.model_dump(),
                # What pass 1 produced, for the record (and for tests of the memory bound).
                "num_runs": len(index.runs),
                "max_run_bytes": max(index.line_bytes, default=0),
                "numpy_version": np.__version__,
            },
            arrow_schema=source.arrow_schema,
            parts=parts,
            # The input's quarantine stays with the input: nothing quarantined reaches the shuffle.
            quarantine=[],
            stats={
                "documents": num_docs,
                "bytes": source.stats.bytes,  # the same documents, so the same UTF-8 text bytes
                "duplicate_ids": source.stats.duplicate_ids,
                "duplicate_id_examples": source.stats.duplicate_id_examples,
                "splits": {"train": num_train, "val": cfg.val_docs},
            },
        )
    )
    store.delete(runs_dir, recursive=True)  # only after the commit: a crash before reuses them
    log.info(
        "shuffle %s → %s: %d documents, %d runs, job %s", source.ref, manifest.ref, num_docs, len(index.runs), job_id
    )
    return manifest


def chunk_of(part: PartInfo) -> int | None:
    """The train chunk a part of a shuffled dataset belongs to (None for val and other datasets)."""
    m = _CHUNK_RE.search(part.path)
    return int(m.group(1)) if m else None


def chunk_parts(manifest: Manifest, chunks: list[int] | None) -> list[PartInfo]:
    """Parts of a shuffled dataset: all (None), or val plus the given train chunks."""
    if chunks is None:
        return manifest.parts
    present = {c for p in manifest.parts if (c := chunk_of(p)) is not None}
    if not present:
        raise ValueError(f"chunks={chunks}: {manifest.ref} has no train chunks (only `blt-data shuffle` output has)")
    missing = sorted(set(chunks) - present)
    if missing:
        raise ValueError(f"chunks {missing} are not in {manifest.ref}, which has chunks {min(present)}..{max(present)}")
    return [p for p in manifest.parts if p.split != "train" or chunk_of(p) in chunks]


def _check_plan(source: Manifest, cfg: ShuffleConfig, num_docs: int) -> None:
    if cfg.val_docs > num_docs:
        raise ValueError(f"val_docs={cfg.val_docs} is more than the {num_docs} documents of {source.ref}")
    if num_docs - cfg.val_docs < cfg.num_chunks:
        raise ValueError(
            f"num_chunks={cfg.num_chunks} but {source.ref} leaves only {num_docs - cfg.val_docs} train "
            f"documents after val_docs={cfg.val_docs}: some chunks would be empty"
        )
    # Text bytes are a lower bound on line bytes (JSON adds quotes, keys, escapes).
    min_runs = -(-source.stats.bytes // cfg.memory_bytes)
    if min_runs > MAX_RUNS:
        raise ValueError(
            f"memory_bytes={cfg.memory_bytes} is too small for {source.ref} ({source.stats.bytes} text bytes): "
            f"it needs more than {MAX_RUNS} runs; use memory_bytes ≥ {-(-source.stats.bytes // MAX_RUNS)}"
        )


def _write_runs(registry: Registry, source: Manifest, runs_dir: str, cfg: ShuffleConfig, progress: bool) -> RunsIndex:
    store = registry.store
    runs: list[PartInfo] = []
    line_bytes: list[int] = []
    buf = bytearray()  # the current run: whole lines, each ending in a newline
    ends: list[np.ndarray] = []  # line end offsets into buf, one array per appended block
    num_lines = 0  # lines in buf
    docs_done = 0  # lines in finished runs

    def flush() -> None:
        nonlocal buf, ends, num_lines, docs_done
        if len(runs) == MAX_RUNS:
            raise ValueError(
                f"memory_bytes={cfg.memory_bytes} needs more than {MAX_RUNS} runs for {source.ref}; raise it"
            )
        rng = np.random.default_rng([cfg.seed, _RUN_STREAM, len(runs)])
        line_ends = np.concatenate(ends)
        order = rng.permutation(num_lines)
        rel = f"{runs_dir}/run-{len(runs):06d}{PART_EXT}"
        writer = PartWriter(store, rel, rel, level=RUN_ZSTD_LEVEL, threads=ZSTD_THREADS)
        try:
            for block, rows in _gather(memoryview(buf), line_ends, order):
                writer.write_block(block, rows)
        except BaseException:
            writer.abort()
            raise
        runs.append(writer.close())
        line_bytes.append(len(buf))
        docs_done += num_lines
        buf, ends, num_lines = bytearray(), [], 0

    with _progress(progress, f"shuffle runs {source.ref}", None) as bar:
        # Every split of the input is shuffled together; the output's val is a fresh sample.
        for part in source.parts:
            rel = registry.part_path(source, part)
            # Checked against the manifest (size on open, sha256 at the end of the read).
            for block, block_ends in _line_blocks(store.open_checked(rel, part.bytes, part.sha256, READ_BYTES), READ_BYTES, store.uri(rel)):
                pos = 0
                while pos < len(block_ends):
                    start = int(block_ends[pos - 1]) if pos else 0
                    room = cfg.memory_bytes - len(buf) - LINE_INDEX_BYTES * num_lines
                    # How many of the block's next lines still fit into the run, index included.
                    cost = block_ends[pos:] - start + LINE_INDEX_BYTES * np.arange(1, len(block_ends) - pos + 1)
                    fit = int(np.searchsorted(cost, room, side="right"))
                    if fit == 0 and not buf:
                        fit = 1  # a document larger than memory_bytes: a run of its own
                    if fit == 0:
                        flush()
                        continue
                    ends.append(block_ends[pos : pos + fit] - start + len(buf))
                    buf += block[start : int(block_ends[pos + fit - 1])]
                    num_lines += fit
                    pos += fit
                bar.update(len(block))
                bar.set_postfix(docs=docs_done + num_lines, runs=len(runs), refresh=False)
        if buf:
            flush()

    index = RunsIndex(runs=runs, line_bytes=line_bytes)
    store.write_bytes(f"{runs_dir}/runs.json", index.model_dump_json(indent=1).encode())
    return index


def _load_runs_index(store: Store, runs_dir: str) -> RunsIndex | None:
    """A finished pass 1 of this job (from a run that crashed before its commit), if any."""
    try:
        index = RunsIndex.model_validate_json(store.read_bytes(f"{runs_dir}/runs.json"))
    except (FileNotFoundError, ValueError):
        return None
    if all(store.exists(r.path) for r in index.runs):
        return index
    return None


def _merge_runs(store: Store, index: RunsIndex, cfg: ShuffleConfig) -> Iterator[tuple[bytes, np.ndarray]]:
    """Blocks of lines in merged order: (bytes, end offset of each line)."""
    num_runs = len(index.runs)
    # Documents held in pass 2: one read block per run, plus a merge block held twice (the lines
    # taken from the runs and their merged copy): at most ~3/4 of memory_bytes (floors aside).
    read_bytes = min(READ_BYTES, max(64 << 10, cfg.memory_bytes // (4 * max(num_runs, 1))))
    block_bytes = min(16 << 20, max(64 << 10, cfg.memory_bytes // 8))
    mean_line = max(1, sum(index.line_bytes) // max(1, sum(r.rows for r in index.runs)))
    block_lines = max(1, block_bytes // mean_line)

    rng = np.random.default_rng([cfg.seed, _MERGE_STREAM])
    remaining = np.array([r.rows for r in index.runs], dtype=np.int64)
    readers = [_RunReader(store.open_checked(r.path, r.bytes, r.sha256, read_bytes), read_bytes, store.uri(r.path)) for r in index.runs]
    try:
        while (total := int(remaining.sum())) > 0:
            # Drawing run r with probability remaining_r / total, line after line, makes a uniform
            # random interleaving. Drawn a block at a time: how many of the next n draws hit each
            # run is multivariate hypergeometric, and their order is a uniform permutation.
            n = min(block_lines, total)
            counts = rng.multivariate_hypergeometric(remaining, n) if num_runs > 1 else np.array([n])
            remaining -= counts
            which = rng.permutation(np.repeat(np.arange(num_runs), counts))
            taken = [readers[r].take(int(k)) for r, k in enumerate(counts) if k]
            data = b"".join(t[0] for t in taken)
            offsets = np.cumsum([0] + [len(t[0]) for t in taken[:-1]])
            line_ends = np.concatenate([t[1] + off for t, off in zip(taken, offsets)])
            starts = line_ends - np.diff(line_ends, prepend=0)
            # The taken lines are grouped by run, in run order; merge position i takes the next
            # unused line of run which[i], which is line i's rank in a stable sort by run.
            source_of = np.empty(n, dtype=np.int64)
            source_of[np.argsort(which, kind="stable")] = np.arange(n)
            starts, line_ends = starts[source_of], line_ends[source_of]
            yield _join(memoryview(data), starts, line_ends), np.cumsum(line_ends - starts)
    finally:
        for reader in readers:
            reader.close()


class _RunReader:
    """Streams a run's lines and hands them out in contiguous groups."""

    def __init__(self, f: IO[bytes], read_bytes: int, uri: str):
        self._blocks = _line_blocks(f, read_bytes, uri)
        self._data: memoryview | bytes = b""
        self._ends = np.empty(0, dtype=np.int64)
        self._pos = 0

    def take(self, k: int) -> tuple[bytes | memoryview, np.ndarray]:
        """The next k lines as (bytes, end offsets relative to those bytes)."""
        pieces: list[bytes | memoryview] = []
        piece_ends: list[np.ndarray] = []
        size = 0
        while k:
            if self._pos == len(self._ends):
                self._data, self._ends = next(self._blocks)
                self._pos = 0
            m = min(k, len(self._ends) - self._pos)
            start = int(self._ends[self._pos - 1]) if self._pos else 0
            stop = int(self._ends[self._pos + m - 1])
            pieces.append(self._data[start:stop])
            piece_ends.append(self._ends[self._pos : self._pos + m] - start + size)
            size += stop - start
            self._pos += m
            k -= m
        if len(pieces) == 1:
            return pieces[0], piece_ends[0]
        return b"".join(pieces), np.concatenate(piece_ends)

    def close(self) -> None:
        self._blocks.close()


class _Segment(NamedTuple):
    folder: str  # under the job folder: "val" or "chunk-NNNNNN"
    split: str
    rows: int


class _OutputSink:
    """Routes the merged lines into segments (val, chunk 0, chunk 1, ...) of fixed line counts;
    inside a segment, a part closes once it holds ``target_part_bytes`` (as DocumentWriter does).
    """

    def __init__(self, store: Store, job_dir: str, prefix: str, segments: list[_Segment], target_part_bytes: int):
        self.store = store
        self.job_dir = job_dir
        self.prefix = prefix
        self.segments = [s for s in segments if s.rows > 0]
        self.target_part_bytes = target_part_bytes
        self.parts: list[PartInfo] = []
        self.rows = 0
        self._segment = 0
        self._left = self.segments[0].rows if self.segments else 0
        self._part_index = 0
        self._part: PartWriter | None = None

    def write(self, data: bytes, ends: np.ndarray) -> None:
        data = memoryview(data)
        pos = 0
        while pos < len(ends):
            if self._part is None:
                folder, split, _ = self.segments[self._segment]
                rel = f"{folder}/{part_name(self._part_index)}"
                self._part = PartWriter(
                    self.store, f"{self.job_dir}/{rel}", f"{self.prefix}/{rel}", split, threads=ZSTD_THREADS
                )
            start = int(ends[pos - 1]) if pos else 0
            # First line with which the part reaches its target size (it closes after that line).
            full = int(np.searchsorted(ends, start + self.target_part_bytes - self._part.uncompressed_bytes))
            take = min(len(ends) - pos, self._left, full - pos + 1)
            self._part.write_block(data[start : int(ends[pos + take - 1])], take)
            pos += take
            self.rows += take
            self._left -= take
            if self._left == 0 or self._part.uncompressed_bytes >= self.target_part_bytes:
                self._close_part()

    def _close_part(self) -> None:
        assert self._part is not None
        self.parts.append(self._part.close())
        self._part = None
        self._part_index += 1
        if self._left == 0:
            self._segment += 1
            self._part_index = 0
            if self._segment < len(self.segments):
                self._left = self.segments[self._segment].rows

    def close(self) -> list[PartInfo]:
        if self._part is not None or self._segment < len(self.segments):
            raise RuntimeError(f"merge ended early: segment {self._segment}, {self._left} lines missing")
        return self.parts


def _line_blocks(f: IO[bytes], read_bytes: int, uri: str = "") -> Iterator[tuple[memoryview, np.ndarray]]:
    """Whole lines of a zstd JSONL object, a block at a time: (bytes, end offset of each line).

    Every line ends with its newline (one is added to a last line that lacks it).
    """
    with f, _zstd_errors_name(uri):
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        pending: list[bytes] = []  # the start of a line that has not ended yet
        while chunk := reader.read(read_bytes):
            last = chunk.rfind(b"\n")
            if last < 0:
                pending.append(chunk)  # a line longer than read_bytes: keep reading
                continue
            view = memoryview(chunk)
            data = memoryview(b"".join([*pending, view[: last + 1]])) if pending else view[: last + 1]
            pending = [bytes(view[last + 1 :])] if last + 1 < len(chunk) else []
            yield data, np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == _NEWLINE) + 1
        if pending:
            data = b"".join([*pending, b"\n"])
            yield memoryview(data), np.array([len(data)], dtype=np.int64)


@contextmanager
def _zstd_errors_name(uri: str) -> Iterator[None]:
    try:
        yield
    except zstandard.ZstdError as e:
        raise ValueError(f"{uri or 'a run'} is not a readable zstd JSONL part: {e}") from None


def _gather(data: memoryview, line_ends: np.ndarray, order: np.ndarray) -> Iterator[tuple[bytes, int]]:
    """The lines ``order`` names, in that order, joined into blocks of about WRITE_BLOCK_BYTES."""
    starts = line_ends - np.diff(line_ends, prepend=0)
    sizes = np.cumsum(line_ends[order] - starts[order])
    cuts = np.searchsorted(sizes, np.arange(WRITE_BLOCK_BYTES, int(sizes[-1]), WRITE_BLOCK_BYTES), side="right")
    first = 0
    for cut in [*cuts.tolist(), len(order)]:
        if cut > first:
            yield _join(data, starts[order[first:cut]], line_ends[order[first:cut]]), cut - first
            first = cut


def _join(data: memoryview, starts: np.ndarray, stops: np.ndarray) -> bytes:
    # The one per-line Python step: a memoryview slice per line, joined by one C call.
    return b"".join([data[a:b] for a, b in zip(starts.tolist(), stops.tolist())])


def _progress(enabled: bool, desc: str, total: int | None) -> tqdm:
    return tqdm(
        desc=desc, total=total, unit="B", unit_scale=True, unit_divisor=1000, disable=not enabled, smoothing=0.1
    )
