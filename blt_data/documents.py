"""Documents datasets: zstd-compressed JSONL parts, one JSON object per line (DESIGN.md §4).

Each line holds at least ``id`` (string, unique in the dataset) and ``text`` (string); other
fields pass through. Lines that cannot be documents are *quarantined*, never dropped: they go to
a ``_quarantine/`` part with their source location and the reason.

Invariant: a part is published whole (``Store.create``), so a reader never sees a half part;
zstd output is deterministic for a given input and level, so rewriting a part gives the same bytes.
"""

from __future__ import annotations

import json
import zlib
from typing import IO, Any, Iterable, Iterator

import zstandard

from blt_data.registry import Manifest, PartInfo, Registry
from blt_data.storage import Store

ZSTD_LEVEL = 3
DEFAULT_PART_BYTES = 256 * 10**6
READ_CHUNK = 4 << 20
DECOMPRESS_SLICE = 128 << 10
PART_EXT = ".jsonl.zst"


def part_name(index: int, ext: str = PART_EXT) -> str:
    return f"part-{index:06d}{ext}"


# Deeper JSON is refused. The standard parser recurses once per level and stops with
# RecursionError near 1000 levels (a depth that depends on the caller's stack): below that, the
# limit makes the outcome the same wherever the line is parsed; above, the RecursionError is caught.
MAX_JSON_DEPTH = 256


class JSONLineError(ValueError):
    """A line that is not one JSON value we can hold; the message is the quarantine reason."""


def parse_json_line(raw: bytes) -> Any:
    """The JSON value of one line, or `JSONLineError` saying why not.

    Bytes must be UTF-8 (a leading BOM is allowed). Refused: nesting deeper than
    `MAX_JSON_DEPTH`, integers longer than Python's digit limit (4300), and whatever
    `json` itself refuses (NUL and other raw control characters inside strings included).
    NaN and Infinity are accepted, as `json` does.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONLineError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        raise JSONLineError(f"not valid JSON: {e}") from None
    except ValueError as e:  # an integer past sys.get_int_max_str_digits()
        raise JSONLineError(f"unreadable JSON number: {e}") from None
    except RecursionError:  # the parser gives up near the interpreter's recursion limit
        raise JSONLineError(f"JSON nested deeper than the parser's limit (the limit is {MAX_JSON_DEPTH})") from None
    # Only a line with more brackets than the limit can nest past it (most lines, code in a
    # string included, hold few containers, and the walk below is over containers, not bytes).
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and (depth := json_depth(value)) > MAX_JSON_DEPTH:
        raise JSONLineError(f"JSON nested {depth} levels deep (the limit is {MAX_JSON_DEPTH})")
    return value


def json_depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node if isinstance(child, (list, dict)))
    return deepest


def encode_line(obj: dict[str, Any]) -> bytes:
    # default=str: pass-through fields from Parquet (timestamps, decimals) must not stop a job.
    return json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8") + b"\n"


def check_document(obj: Any, text_field: str = "text") -> str | None:
    """Why ``obj`` cannot be a document, or None when it can."""
    if not isinstance(obj, dict):
        return f"not a JSON object (got {type(obj).__name__})"
    if text_field not in obj:
        return f"missing field {text_field!r}"
    text = obj[text_field]
    if not isinstance(text, str):
        return f"field {text_field!r} is {type(text).__name__}, not a string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"field {text_field!r} is not valid Unicode (lone surrogate)"
    return None


def quarantine_record(source: str, line: int, reason: str, raw: bytes | str) -> dict[str, Any]:
    """What a quarantined line becomes: where it came from, why, and the line itself."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="backslashreplace")
    return {"source": source, "line": line, "reason": reason, "raw": raw}


class PartWriter:
    """One zstd JSONL part, streamed to the store and published on ``close``.

    ``threads`` ≥ 1 moves compression to zstd worker threads so it overlaps the caller's work;
    zstd's output is the same for any number of workers ≥ 1 (but differs from ``threads=0``), so
    a given setting always rewrites identical bytes.
    """

    def __init__(
        self, store: Store, rel: str, path_in_manifest: str, split: str = "train",
        level: int = ZSTD_LEVEL, threads: int = 0,
    ):
        self.path_in_manifest = path_in_manifest
        self.split = split
        self._ctx = store.create(rel)
        self._sink = self._ctx.__enter__()
        compressor = zstandard.ZstdCompressor(level=level, threads=threads)
        self._zstd = compressor.stream_writer(self._sink, closefd=False)
        self.rows = 0
        self.uncompressed_bytes = 0

    def write_line(self, line: bytes) -> None:
        self.write_block(line, 1)

    def write_block(self, block: bytes | memoryview, rows: int) -> None:
        """Several complete lines (newlines included) in one call."""
        self._zstd.write(block)
        self.rows += rows
        self.uncompressed_bytes += len(block)

    def close(self) -> PartInfo:
        self._zstd.flush(zstandard.FLUSH_FRAME)
        self._zstd.close()
        self._ctx.__exit__(None, None, None)
        return PartInfo(
            path=self.path_in_manifest,
            rows=self.rows,
            bytes=self._sink.nbytes,
            sha256=self._sink.sha256,
            split=self.split,
        )

    def abort(self) -> None:
        try:
            self._zstd.close()
        finally:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


class DocumentWriter:
    """Writes document lines into parts ``part-NNNNNN.jsonl.zst``, rotating at a target size.

    ``folder`` is store-relative; ``manifest_prefix`` is the same folder relative to the
    dataset directory (what a manifest's part paths start with).
    """

    def __init__(
        self,
        store: Store,
        folder: str,
        manifest_prefix: str,
        target_part_bytes: int = DEFAULT_PART_BYTES,
        first_index: int = 0,
        split: str = "train",
    ):
        self.store = store
        self.folder = folder
        self.manifest_prefix = manifest_prefix
        self.target_part_bytes = target_part_bytes
        self.index = first_index
        self.split = split
        self.parts: list[PartInfo] = []
        self._part: PartWriter | None = None

    def _open(self) -> PartWriter:
        name = part_name(self.index)
        return PartWriter(self.store, f"{self.folder}/{name}", f"{self.manifest_prefix}/{name}", self.split)

    def write_line(self, line: bytes) -> PartInfo | None:
        """Add one line; returns the finished part when this line completed one."""
        if self._part is None:
            self._part = self._open()
        self._part.write_line(line)
        if self._part.uncompressed_bytes >= self.target_part_bytes:
            return self.finish_part()
        return None

    def finish_part(self) -> PartInfo | None:
        if self._part is None:
            return None
        info = self._part.close()
        self._part = None
        self.parts.append(info)
        self.index += 1
        return info

    def close(self) -> list[PartInfo]:
        self.finish_part()
        return self.parts

    def __enter__(self) -> "DocumentWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._part is not None:
            self._part.abort()


def read_chunks(f: IO[bytes], size: int = READ_CHUNK) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def _decompressed(f: IO[bytes], new_decompressor, truncated: Exception) -> Iterator[bytes]:
    """Decompressed chunks of a multi-frame (or multi-member) stream.

    Compressed input is fed in small slices so that when the data is damaged, only the last
    slice's output is lost: what was read before the damage reaches the caller. A stream that
    ends inside a frame raises ``truncated`` (zstd's own stream reader ends quietly instead).
    """
    dobj = new_decompressor()
    inside_frame = False
    for chunk in read_chunks(f):
        for start in range(0, len(chunk), DECOMPRESS_SLICE):
            data = chunk[start : start + DECOMPRESS_SLICE]
            while data:
                out = dobj.decompress(data)
                inside_frame = True
                if out:
                    yield out
                if dobj.eof:  # a frame ended; what follows belongs to the next one
                    data = dobj.unused_data
                    dobj = new_decompressor()
                    inside_frame = False
                else:
                    data = b""
    if inside_frame:
        raise truncated


def zstd_chunks(f: IO[bytes]) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    return _decompressed(f, dctx.decompressobj, zstandard.ZstdError("input ended inside a zstd frame (file truncated)"))


def gzip_chunks(f: IO[bytes]) -> Iterator[bytes]:
    # wbits 16 + MAX_WBITS: gzip framing (header and trailer checked).
    return _decompressed(f, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), EOFError("input ended inside a gzip member (file truncated)"))


def split_lines(chunks: Iterable[bytes], pending: list[bytes] | None = None) -> Iterator[bytes]:
    """Lines (without newline) from an iterable of byte chunks.

    A line longer than a chunk is gathered piece by piece (no quadratic re-concatenation), so a
    50 MB single-line document costs one join. ``pending`` receives an unfinished last line if
    the stream raises, so the caller can keep what was read before the damage.
    """
    pending = [] if pending is None else pending
    for chunk in chunks:
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            pending.append(chunk)
            continue
        pending.append(pieces[0])
        yield b"".join(pending)
        pending.clear()
        yield from pieces[1:-1]
        if pieces[-1]:
            pending.append(pieces[-1])
    if pending:
        last = b"".join(pending)
        pending.clear()
        yield last


class DocumentsError(ValueError):
    """A committed documents part that cannot be read as one; the message names the part."""


def iter_lines(store: Store, rel: str, part: PartInfo | None = None) -> Iterator[bytes]:
    """The lines (without newline) of a zstd JSONL object, streamed.

    With ``part`` (its manifest entry), its size is checked on open and its sha256 when the read
    reaches the end (`Store.open_checked`): a part changed after its manifest raises
    `IntegrityError` instead of feeding other bytes to the job.
    """
    f = store.open_checked(rel, part.bytes, part.sha256) if part is not None else store.open_input(rel)
    with f:
        try:
            yield from split_lines(zstd_chunks(f))
        except zstandard.ZstdError as e:
            raise DocumentsError(f"{store.uri(rel)} is not a readable zstd JSONL part: {e}") from None


def count_rows(store: Store, rel: str) -> int:
    if rel.endswith(".parquet"):
        import pyarrow.parquet as pq

        with store.open_input(rel) as f:
            return pq.ParquetFile(f).metadata.num_rows
    return sum(1 for _ in iter_lines(store, rel))


def iter_part_lines(registry: Registry, manifest: Manifest, split: str | None = None) -> Iterator[bytes]:
    for part in manifest.parts_of(split):
        yield from iter_lines(registry.store, registry.part_path(manifest, part), part)


def iter_documents(registry: Registry, manifest: Manifest, split: str | None = None) -> Iterator[dict]:
    """Every document of a documents dataset, part by part, in manifest order."""
    if manifest.kind != "documents":
        raise ValueError(f"{manifest.ref} is a {manifest.kind} dataset, not documents")
    for part in manifest.parts_of(split):
        rel = registry.part_path(manifest, part)
        for i, line in enumerate(iter_lines(registry.store, rel, part)):
            yield parse_document(line, registry.store.uri(rel), i + 1)


def parse_document(line: bytes, where: str, line_no: int) -> dict:
    """One line of a committed documents part (written by this package, so any fault is
    reported as the part's, with its line number)."""
    try:
        doc = parse_json_line(line)
    except JSONLineError as e:
        raise DocumentsError(f"{where} line {line_no}: {e}") from None
    if check_document(doc) is not None or not isinstance(doc.get("id"), str):
        raise DocumentsError(f"{where} line {line_no}: not a document ({check_document(doc) or 'no string id'})")
    return doc
