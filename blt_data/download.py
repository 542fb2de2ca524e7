"""``blt-data download``: any source → a documents dataset in the registry.

Sources (``parse_source``):
  ``stdlib``                  the running interpreter's standard-library ``.py`` files (ids: module paths)
  ``hf:ORG/DATASET[:CONFIG]`` a Hugging Face dataset, streamed through ``datasets`` (a local
                              dataset folder works the same way: ``hf:/path/to/folder``)
  a file, folder or glob      local or ``s3://``; ``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``,
                              ``.parquet``, ``.txt`` (one document per ``.txt`` file)

Resumability: the source is read in a fixed order and parts rotate at fixed points, so part k
is a pure function of the source. After part k (and its quarantine part) is published, a
completion record ``_done/part-k.json`` stores the source position reached and the part's
statistics. A rerun of the same job keeps every recorded part, seeks the source to the
recorded position and goes on from part k+1; the manifest is committed last.

Length: one job with its sources, per-format readers, quarantine and resume records; each part
is short and they share the job's counters.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import zstandard
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from blt_data.documents import (
    DEFAULT_PART_BYTES,
    JSONLineError,
    PartWriter,
    check_document,
    encode_line,
    gzip_chunks,
    iter_lines,
    parse_document,
    parse_json_line,
    part_name,
    quarantine_record,
    read_chunks,
    split_lines,
    zstd_chunks,
)
from blt_data.jobs import output_fields
from blt_data.registry import Manifest, PartInfo, Registry, check_name, job_hash
from blt_data.stats import DatasetStats
from blt_data.storage import IntegrityError, filesystem_for, is_transport_error

log = logging.getLogger(__name__)

LINE_EXTS = (".jsonl", ".jsonl.zst", ".jsonl.gz")
SUPPORTED_EXTS = LINE_EXTS + (".parquet", ".txt")
_GLOB_CHARS = set("*?[")


class DownloadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    name: str
    split: str = Field("train", description="split of a Hugging Face dataset")
    text_field: str = Field("text", description="field holding the document text")
    id_field: str = Field("id", description="field holding the document id (else ids come from positions)")
    limit: int | None = Field(None, ge=1, description="stop after this many documents")
    part_bytes: int = Field(DEFAULT_PART_BYTES, ge=1, description="rotate parts at this many uncompressed bytes")


class SourceError(ValueError):
    """The source cannot be read at all (absent, unsupported, unreachable)."""


@dataclass
class Record:
    """One item read from a source: a parsed object, or the reason it could not be one."""

    source: str  # display name of the file (or dataset)
    line: int  # 1-based line / row number within it
    obj: Any = None
    bad: str | None = None  # reason when the item is not even a JSON value
    raw: bytes | str = b""


@dataclass
class Damage:
    """A file that broke while being read: what was read before the damage is kept."""

    file: str
    error: str
    lines_read: int
    bytes_read: int


Position = tuple[int, int]  # (file index, records consumed in that file)


@dataclass
class Source:
    """A fixed, ordered list of inputs. ``records(start)`` resumes at a position."""

    kind: str
    spec: str
    files: list[str] = field(default_factory=list)  # fsspec URLs (or paths) in reading order
    names: list[str] = field(default_factory=list)  # display names, stable across machines
    skipped: list[str] = field(default_factory=list)
    hf_path: str = ""
    hf_config: str | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)


def parse_source(spec: str, cfg: DownloadConfig) -> Source:
    if spec == "stdlib":
        return _stdlib_source()
    if spec.startswith("hf:"):
        rest = spec[3:]
        # ORG/DATASET:CONFIG, but a local path may itself hold ':' only in odd cases we ignore.
        path, _, config = rest.partition(":") if not rest.startswith("/") else (rest, "", "")
        if not path:
            raise SourceError("hf: source needs a dataset id, e.g. hf:allenai/c4:en")
        return Source(
            kind="hf",
            spec=spec,
            hf_path=path,
            hf_config=config or None,
            names=[spec],
            fingerprint={"kind": "hf", "path": path, "config": config or None, "split": cfg.split},
        )
    return _file_source(spec)


def _stdlib_source() -> Source:
    root = sysconfig.get_paths()["stdlib"]
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for f in filenames:
            if f.endswith(".py"):
                rels.append(os.path.relpath(os.path.join(dirpath, f), root))
    rels.sort()
    sizes = [os.path.getsize(os.path.join(root, r)) for r in rels]
    return Source(
        kind="stdlib",
        spec="stdlib",
        files=[os.path.join(root, r) for r in rels],
        names=[_module_path(r) for r in rels],
        fingerprint={
            "kind": "stdlib",
            "python": sys.version.split()[0],
            "files": job_hash({"files": list(zip(rels, sizes))}),
        },
    )


def _module_path(rel: str) -> str:
    mod = rel[: -len(".py")].replace(os.sep, ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def _file_source(spec: str) -> Source:
    try:
        fs, path = filesystem_for(spec)
        protocol = spec.split("://", 1)[0] + "://" if "://" in spec else ""
        if _GLOB_CHARS & set(path):
            found = sorted(fs.glob(path))
            base = path[: min(path.find(c) for c in _GLOB_CHARS if c in path)].rsplit("/", 1)[0]
        elif fs.isdir(path):
            found = sorted(fs.find(path))
            base = path.rstrip("/")
        elif fs.exists(path):
            if not path.endswith(SUPPORTED_EXTS):
                raise SourceError(f"unsupported file type: {spec} (supported: {', '.join(SUPPORTED_EXTS)})")
            found = [path]
            base = path.rsplit("/", 1)[0]
        else:
            raise SourceError(f"source not found: {spec}")
    except SourceError:
        raise
    except (PermissionError, OSError) as e:
        raise SourceError(f"cannot read source {spec}: {type(e).__name__}: {e}") from None
    files = [p for p in found if p.endswith(SUPPORTED_EXTS)]
    skipped = [p for p in found if not p.endswith(SUPPORTED_EXTS)]
    if not files:
        raise SourceError(f"no {', '.join(SUPPORTED_EXTS)} files at {spec}")
    sizes = [fs.size(p) for p in files]
    names = [os.path.relpath(p, base) if base else p for p in files]
    return Source(
        kind="files",
        spec=spec,
        files=[protocol + p if protocol and protocol != "file://" else p for p in files],
        names=names,
        skipped=[os.path.relpath(p, base) for p in skipped],
        fingerprint={"kind": "files", "files": job_hash({"f": list(zip(names, sizes))})},
    )


def read_records(source: Source, cfg: DownloadConfig, start: Position, damage: list[Damage]) -> Iterator[tuple[Position, Record]]:
    """Every record from ``start`` on, with the position just after it. Damage is appended, not raised."""
    if source.kind == "hf":
        yield from _hf_records(source, cfg, start[1])
        return
    for fi in range(start[0], len(source.files)):
        skip = start[1] if fi == start[0] else 0
        url, name = source.files[fi], source.names[fi]
        if source.kind == "stdlib" or url.endswith(".txt"):
            if skip == 0:
                yield (fi, 1), _whole_file_record(url, name, stdlib=source.kind == "stdlib")
        elif url.endswith(".parquet"):
            yield from _parquet_records(fi, url, name, skip, damage)
        else:
            yield from _line_records(fi, url, name, skip, damage)


def _whole_file_record(url: str, name: str, stdlib: bool) -> Record:
    fs, path = filesystem_for(url)
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(name, 1, bad=f"not UTF-8 ({e.reason} at byte {e.start})", raw=data)
    return Record(name, 1, obj={"id": name, "text": text})


def _decompressed_chunks(f, url: str) -> Iterator[bytes]:
    if url.endswith(".zst"):
        return zstd_chunks(f)
    if url.endswith(".gz"):
        return gzip_chunks(f)
    return read_chunks(f)


def _line_records(fi: int, url: str, name: str, skip: int, damage: list[Damage]) -> Iterator[tuple[Position, Record]]:
    fs, path = filesystem_for(url)
    line_no = 0
    pending: list[bytes] = []
    nbytes = 0
    with fs.open(path, "rb", block_size=8 << 20) as f:
        try:
            for raw in split_lines(_decompressed_chunks(f, url), pending):
                line_no += 1
                nbytes += len(raw) + 1
                if line_no <= skip:
                    continue
                yield (fi, line_no), _parse_line(name, line_no, raw)
        except (zstandard.ZstdError, EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
            _raise_if_transport(e, url)
            partial = b"".join(pending)
            damage.append(Damage(file=name, error=f"{type(e).__name__}: {e}", lines_read=line_no, bytes_read=nbytes + len(partial)))
            log.warning("%s is damaged after %d lines (%d bytes): %s", name, line_no, nbytes, e)
            if partial:
                line_no += 1
                if line_no > skip:
                    yield (fi, line_no), Record(name, line_no, bad="incomplete line: file damaged here", raw=partial)


def _raise_if_transport(e: BaseException, url: str) -> None:
    """A store that cannot be reached is no damaged file: stop (a rerun resumes) rather than
    commit a dataset without the rest of the file."""
    if is_transport_error(e):
        raise SourceError(f"cannot read {url}: {type(e).__name__}: {e}") from None


def _parse_line(name: str, line_no: int, raw: bytes) -> Record:
    if not raw.strip():
        return Record(name, line_no, bad="blank", raw=raw)
    try:
        return Record(name, line_no, obj=parse_json_line(raw))
    except JSONLineError as e:
        return Record(name, line_no, bad=str(e), raw=raw)


def _parquet_records(fi: int, url: str, name: str, skip: int, damage: list[Damage]) -> Iterator[tuple[Position, Record]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = filesystem_for(url)
    row = 0
    with fs.open(path, "rb", block_size=8 << 20) as f:
        try:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=1024):
                if row + batch.num_rows <= skip:
                    row += batch.num_rows
                    continue
                for obj in batch.to_pylist():
                    row += 1
                    if row > skip:
                        yield (fi, row), Record(name, row, obj=obj)
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            _raise_if_transport(e, url)
            damage.append(Damage(file=name, error=f"{type(e).__name__}: {e}", lines_read=row, bytes_read=-1))
            log.warning("%s is damaged after %d rows: %s", name, row, e)


def _hf_records(source: Source, cfg: DownloadConfig, skip: int) -> Iterator[tuple[Position, Record]]:
    import datasets

    try:
        ds = datasets.load_dataset(source.hf_path, source.hf_config, split=cfg.split, streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean "cannot open"
        raise SourceError(f"cannot open {source.spec} (split {cfg.split!r}): {type(e).__name__}: {e}") from None
    if skip:
        ds = ds.skip(skip)
    for i, obj in enumerate(ds, start=skip + 1):
        yield (0, i), Record(source.spec, i, obj=obj)


class _Downloader:
    """Writes records into part k / quarantine part k and rotates with a completion record."""

    def __init__(self, registry: Registry, cfg: DownloadConfig, source: Source, job_id: str):
        self.registry = registry
        self.store = registry.store
        self.cfg = cfg
        self.source = source
        self.job = registry.job_dir(cfg.name, job_id)
        self.prefix = f"_jobs/{job_id}"
        self.index = 0
        self.data: PartWriter | None = None
        self.quarantine: PartWriter | None = None
        self.stats = DatasetStats()
        self.seen: set[str] = set()

    # --- resume ---------------------------------------------------------------------------

    def load_finished(self) -> tuple[Position, list[dict]]:
        """The completion records of parts 0..k-1 (contiguous) and the position after them.

        A record that cannot be read, or whose part no longer matches it, ends the list there:
        parts are a pure function of the source, so that part and the ones after it are redone.
        """
        records: list[dict] = []
        seen: set[str] = set()  # ids of kept parts, so duplicates across the resume point are caught
        dataset_dir = self.registry.dataset_dir(self.cfg.name)
        while True:
            rel = f"{self.job}/_done/{part_name(len(records), '.json')}"
            if not self.store.exists(rel):
                break
            ids = []
            try:
                rec = _check_record(parse_json_line(self.store.read_bytes(rel)), len(records))
                if rec["part"]:
                    part = PartInfo(**rec["part"])
                    where = f"{dataset_dir}/{part.path}"
                    for i, line in enumerate(iter_lines(self.store, where, part)):
                        ids.append(parse_document(line, self.store.uri(where), i + 1)["id"])
            except (ValueError, KeyError, TypeError, FileNotFoundError, IntegrityError) as e:
                log.warning("redoing from part %d: %s cannot be trusted (%s)", len(records), self.store.uri(rel), e)
                break
            seen.update(ids)
            records.append(rec)
        self.seen = seen
        self.index = len(records)
        start = tuple(records[-1]["end"]) if records else (0, 0)
        return start, records  # type: ignore[return-value]

    # --- writing --------------------------------------------------------------------------

    def add(self, rec: Record) -> int:
        """Write one record; returns the UTF-8 bytes of text written (0 if quarantined)."""
        reason = rec.bad or check_document(rec.obj, self.cfg.text_field)
        if reason == "blank":
            self.stats.blank_lines += 1
            return 0
        if reason:
            self._quarantine(rec, reason)
            return 0
        doc, duplicate = self._document(rec)
        try:
            line = encode_line(doc)
        except (UnicodeEncodeError, ValueError, RecursionError) as e:
            # A value JSON can parse but UTF-8 cannot hold (a lone surrogate outside the text),
            # or a Parquet value nested or sized past what `json` writes.
            self._quarantine(rec, f"cannot be written as a document: {type(e).__name__}: {e}")
            return 0
        if duplicate:
            self.stats.duplicate_ids += 1
            if len(self.stats.duplicate_id_examples) < 20:
                self.stats.duplicate_id_examples.append(duplicate)
        self.seen.add(doc["id"])
        if self.data is None:
            self.data = self._open_part("")
        text_bytes = len(doc["text"].encode("utf-8"))
        self.data.write_line(line)
        self.stats.documents += 1
        self.stats.bytes += text_bytes
        return text_bytes

    def _document(self, rec: Record) -> tuple[dict[str, Any], str | None]:
        """The document line's object, and an example for the stats when its id was a duplicate."""
        obj = rec.obj
        text = obj[self.cfg.text_field]
        raw_id = obj.get("id") if self.source.kind == "stdlib" else obj.get(self.cfg.id_field)
        positional = f"{rec.source}:{rec.line}"
        doc_id = positional if raw_id is None or raw_id == "" else str(raw_id)
        doc = {k: v for k, v in obj.items() if k not in (self.cfg.text_field, self.cfg.id_field)}
        duplicate = None
        if doc_id in self.seen:
            duplicate = f"{doc_id} (again at {positional})"
            doc["duplicate_of"] = doc_id
            doc_id = positional
            while doc_id in self.seen:  # a positional id can only collide with a hand-made one
                doc_id += "#"
        doc["id"] = doc_id
        doc["text"] = text
        return doc, duplicate

    def _quarantine(self, rec: Record, reason: str) -> None:
        if self.quarantine is None:
            self.quarantine = self._open_part("_quarantine/")
        record = quarantine_record(rec.source, rec.line, reason, rec.raw)
        try:
            line = encode_line(record)
        except UnicodeEncodeError:  # a lone surrogate (in a file name, say): escaped, JSON allows it
            line = json.dumps(record, default=str).encode("ascii") + b"\n"
        self.quarantine.write_line(line)
        self.stats.quarantined += 1

    def _open_part(self, sub: str) -> PartWriter:
        name = part_name(self.index)
        return PartWriter(self.store, f"{self.job}/{sub}{name}", f"{self.prefix}/{sub}{name}", "quarantine" if sub else "train")

    def part_full(self) -> bool:
        return any(w is not None and w.uncompressed_bytes >= self.cfg.part_bytes for w in (self.data, self.quarantine))

    def finish_part(self, end: Position, damage: list[Damage]) -> dict | None:
        """Publish part k and its quarantine part, then the completion record (last)."""
        self.stats.damaged_files.extend(vars(d) for d in damage)
        damage.clear()
        if self.data is None and self.quarantine is None and not (self.stats.damaged_files or self.stats.blank_lines):
            return None
        record = {
            "index": self.index,
            "end": list(end),
            "part": self.data.close().model_dump() if self.data else None,
            "quarantine": self.quarantine.close().model_dump() if self.quarantine else None,
            "stats": self.stats.model_dump(exclude_defaults=True),
        }
        self.store.write_bytes(f"{self.job}/_done/{part_name(self.index, '.json')}", json.dumps(record).encode())
        self.data = self.quarantine = None
        self.stats = DatasetStats()
        self.index += 1
        return record


def _check_record(rec: Any, index: int) -> dict:
    """A completion record as `finish_part` writes it, or ValueError."""
    if not isinstance(rec, dict) or rec.get("index") != index:
        raise ValueError(f"not the record of part {index}")
    end = rec["end"]
    if not (isinstance(end, list) and len(end) == 2 and all(type(v) is int and v >= 0 for v in end)):
        raise ValueError(f"bad source position {end!r}")
    for key in ("part", "quarantine"):
        if rec[key] is not None:
            PartInfo(**rec[key])
    DatasetStats(**rec["stats"])
    return rec


def download(registry: Registry, cfg: DownloadConfig, progress: bool = False) -> Manifest:
    """Run (or resume, or reuse) a download; returns the committed manifest."""
    check_name(cfg.name)
    source = parse_source(cfg.source, cfg)
    params = output_fields(cfg, exclude={"name"})
    job_id = job_hash({"step": "download", "source": source.fingerprint, "params": params})
    existing = registry.find_job(cfg.name, job_id)
    if existing is not None:
        log.info("%s was already made by job %s; reusing it", existing.ref, job_id)
        return existing

    dl = _Downloader(registry, cfg, source, job_id)
    start, records = dl.load_finished()
    done = sum((DatasetStats(**r["stats"]) for r in records), DatasetStats())
    done_docs, done_bytes = done.documents, done.bytes
    if records:
        log.info("resuming job %s after %d finished parts (%d documents)", job_id, len(records), done_docs)
    damage: list[Damage] = []
    bar = tqdm(
        total=None, initial=done_bytes, unit="B", unit_scale=True, unit_divisor=1000,
        desc=f"download {cfg.name}", disable=not progress, dynamic_ncols=True,
    )
    docs = done_docs
    pos: Position = start
    # The limit may have been reached just before an interruption: then only the commit is left.
    reading = read_records(source, cfg, start, damage) if cfg.limit is None or docs < cfg.limit else iter(())
    try:
        for pos, rec in reading:
            bar.update(dl.add(rec))
            docs = done_docs + dl.stats.documents
            if docs % 256 == 0:
                bar.set_postfix(docs=docs, refresh=False)
            if dl.part_full():
                rec_done = dl.finish_part(pos, damage)
                records.append(rec_done)
                done_docs += rec_done["stats"].get("documents", 0)
            if cfg.limit is not None and docs >= cfg.limit:
                break
        last = dl.finish_part(pos, damage)
        if last:
            records.append(last)
    finally:
        bar.set_postfix(docs=docs)
        bar.close()
    return _commit(registry, cfg, source, job_id, records)


def _commit(registry: Registry, cfg: DownloadConfig, source: Source, job_id: str, records: list[dict]) -> Manifest:
    stats = sum((DatasetStats(**r["stats"]) for r in records), DatasetStats(skipped_files=source.skipped))
    stats.duplicate_id_examples = stats.duplicate_id_examples[:20]
    stats.splits = {"train": stats.documents}
    parts = [PartInfo(**r["part"]) for r in records if r["part"]]
    quarantine = [PartInfo(**r["quarantine"]) for r in records if r["quarantine"]]
    manifest = Manifest(
        name=cfg.name,
        kind="documents",
        job_id=job_id,
        parents=[],
        params={**cfg.model_dump(exclude={"name"}), "source_fingerprint": source.fingerprint},
        arrow_schema={"id": "string", "text": "large_string"},
        parts=parts,
        quarantine=quarantine,
        stats=stats,
    )
    return registry.commit(manifest)
