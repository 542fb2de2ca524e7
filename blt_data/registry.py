"""The dataset registry: immutable, versioned manifests on a store (DESIGN.md §5).

Layout under the store root::

    datasets/<name>/v<NNNN>/manifest.json             immutable, written last, put-if-absent
    datasets/<name>/v<NNNN>/parts-<sha16>.parquet     the part list of a large manifest (format 2),
                                                      written before its manifest, put-if-absent
    datasets/<name>/_jobs/<job-id>/part-<unit>.*      parts, written first
    models/<name>/v<NNNN>/manifest.json               written last, put-if-absent
    models/<name>/_jobs/<job-id>/{model.safetensors, config.json}
                                                      model files listed as the manifest's parts
    models/<name>/_jobs/<job-id>/checkpoints/step-<N>/   training checkpoints (blt_model.checkpoint)

Invariant: nothing exists until its manifest does. Parts are written first under the job's
folder; the manifest is created last with put-if-absent, so of two writers racing for one
version exactly one wins and the other moves on to the next version.

Manifest formats. Format 1 holds the part list inline (``parts``, ``quarantine``). A manifest of
more than ``INLINE_PARTS`` parts (quarantine included) is written as format 2: ``manifest.json``
holds everything but the part list plus ``parts_file`` {path, count, quarantine, bytes, sha256},
and the parts are rows of a Parquet file in the same version folder (columns path, rows, bytes,
sha256 as 32 raw bytes, split, quarantine). So a small dataset stays one JSON file that older code and a person
can read, and a large one costs O(1) to resolve and show; its part list is read only by code that
needs it (`Manifest.part_table`, columnar; `Manifest.parts`, pydantic objects, for callers that
want them), and is checked against the manifest's size and sha256 when read. A manifest of a
newer format than this code knows is refused with a message that says so.

Length: the manifest, its two formats and the columnar part list are one concept (what a
version holds); the commit and gc must agree with them, so they stay side by side.
TODO(part-list-module): `PartTable` and the part-list file could move to their own module.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_serializer, model_validator

from blt_data import __version__
from blt_data.stats import DatasetStats
from blt_data.storage import Store

FORMAT_VERSION = 2  # the newest manifest format this code reads and writes
INLINE_FORMAT_VERSION = 1  # parts inline in manifest.json
INLINE_PARTS = 1000  # a manifest of more parts than this keeps them in a Parquet part list
Kind = Literal["documents", "patches", "entropy-model", "blt-checkpoint"]
MODEL_KINDS = ("entropy-model", "blt-checkpoint")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REF_RE = re.compile(r"^(?P<name>[^@]+)(?:@v?(?P<version>\d+))?$")
_VERSION_DIR_RE = re.compile(r"^v(\d{4,})$")
_FORMAT_RE = re.compile(rb'"format_version"\s*:\s*(-?\d+)')


class RegistryError(ValueError):
    """A reference that does not resolve, a bad name, or a manifest that cannot be read."""


class PartInfo(BaseModel):
    """One file of a dataset. ``path`` is relative to ``<store>/datasets/<name>/``."""

    model_config = ConfigDict(extra="forbid")
    path: str
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    split: str = "train"

    @field_validator("path")
    @classmethod
    def _inside_dataset(cls, path: str) -> str:
        # A tampered manifest must not point readers at objects outside its dataset.
        if not path or path.startswith("/") or "\\" in path or ".." in path.split("/") or "://" in path:
            raise ValueError(f"part path {path!r} is not a relative path inside the dataset")
        return path


PARTS_SCHEMA = pa.schema([
    ("path", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.binary(32)),
    ("split", pa.string()), ("quarantine", pa.bool_()),
])


class PartTable:
    """A part list as columns: the form code that handles 10^6 parts uses. Parts first, then
    quarantine parts, each in manifest order. ``table`` holds every row of the list (Arrow);
    a `select`ed table is a view of some of its rows (``index``), so choosing a split copies no
    strings. ``rows``, ``bytes`` and ``is_quarantine`` are numpy columns of the view. ``sha256``
    is held as 32 raw bytes (half the size of hex, and no pattern to check); `PartInfo` has hex."""

    def __init__(self, table: pa.Table, index: np.ndarray | None = None):
        self.table = table
        self.index = index  # rows of `table` in this view; None: all of them
        pick = (lambda a: a) if index is None else (lambda a: a[index])
        self.rows = pick(table.column("rows").to_numpy())
        self.bytes = pick(table.column("bytes").to_numpy())
        self.is_quarantine = pick(table.column("quarantine").to_numpy(zero_copy_only=False))
        self._splits: dict[str | None, PartTable] = {}

    @classmethod
    def of(cls, parts: list[PartInfo], quarantine: list[PartInfo] = ()) -> "PartTable":
        every = [*parts, *quarantine]
        return cls(pa.table({
            "path": pa.array([p.path for p in every], pa.string()),
            "rows": pa.array([p.rows for p in every], pa.int64()),
            "bytes": pa.array([p.bytes for p in every], pa.int64()),
            "sha256": pa.array([bytes.fromhex(p.sha256) for p in every], pa.binary(32)),
            "split": pa.array([p.split for p in every], pa.string()),
            "quarantine": pa.array([False] * len(parts) + [True] * len(quarantine), pa.bool_()),
        }, schema=PARTS_SCHEMA))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_parts(self) -> int:
        return len(self) - int(self.is_quarantine.sum())

    def _row(self, i: int) -> int:
        return i if self.index is None else int(self.index[i])

    def rows_table(self) -> pa.Table:
        """This view's rows as an Arrow table."""
        return self.table if self.index is None else self.table.take(pa.array(self.index))

    def paths(self) -> list[str]:
        return self.rows_table().column("path").to_pylist()

    def path(self, i: int) -> str:
        return self.table.column("path")[self._row(i)].as_py()

    def info(self, i: int) -> PartInfo:
        r = self._row(i)
        row = {k: self.table.column(k)[r].as_py() for k in ("path", "rows", "bytes", "sha256", "split")}
        return PartInfo.model_construct(**row | {"sha256": row["sha256"].hex()})  # the table was checked whole

    def infos(self, quarantine: bool = False) -> list[PartInfo]:
        picked = self.rows_table().filter(pa.array(self.is_quarantine == quarantine)).drop_columns(["quarantine"])
        return [PartInfo.model_construct(**row | {"sha256": row["sha256"].hex()}) for row in picked.to_pylist()]

    def select(self, split: str | None = None) -> "PartTable":
        """The parts (no quarantine) of one split, or of every split: a view, made once."""
        if split not in self._splits:
            mask = ~self.is_quarantine
            if split is not None:
                mask &= pc.equal(self.rows_table().column("split"), split).to_numpy(zero_copy_only=False)
            chosen = np.flatnonzero(mask)
            self._splits[split] = PartTable(self.table, chosen if self.index is None else self.index[chosen])
        return self._splits[split]

    def to_parquet(self) -> bytes:
        sink = pa.BufferOutputStream()
        # Dictionaries only where values repeat: tried on unique paths and hashes they slow reads.
        pq.write_table(self.rows_table(), sink, compression="zstd", row_group_size=1 << 20, use_dictionary=["split"])
        return sink.getvalue().to_pybytes()

    @classmethod
    def from_parquet(cls, data: bytes, where: str) -> "PartTable":
        """Read and check a part list: the same rules as `PartInfo`, on whole columns."""
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as e:
            raise RegistryError(f"unreadable part list {where}: {e}") from None
        if table.schema.remove_metadata() != PARTS_SCHEMA:
            raise RegistryError(f"part list {where} has columns {table.schema.names}, expected {PARTS_SCHEMA.names}")
        if any(c.null_count for c in table.columns):
            raise RegistryError(f"part list {where} has empty (null) cells")
        path = table.column("path")
        checks = {
            "a negative row count": pc.less(table.column("rows"), 0),
            "a negative size": pc.less(table.column("bytes"), 0),
            # A tampered list must not point readers at objects outside its dataset.
            "a path outside the dataset": pc.match_substring_regex(path, r"(^$|^/|\\|://|(^|/)\.\.(/|$))"),
        }
        for what, bad in checks.items():
            if pc.any(bad).as_py():
                first = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
                raise RegistryError(f"part list {where}: row {first} has {what} ({path[first].as_py()!r})")
        return cls(table)


class PartsFile(BaseModel):
    """Where a format-2 manifest keeps its part list, and what the list must be."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]*\.parquet$", description="in the manifest's folder")
    count: int = Field(ge=0, description="parts, quarantine parts not included")
    quarantine: int = Field(0, ge=0, description="quarantine parts")
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    # The part lists are stored under "parts" and "quarantine" (format 1); in Python they are
    # the `parts` and `quarantine` properties, which read a format-2 part list when first asked.
    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)
    format_version: int = INLINE_FORMAT_VERSION
    name: str
    version: int = 0  # assigned at commit
    kind: Kind
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    code_version: str = Field(default_factory=lambda: code_version())
    job_id: str
    parents: list[str] = Field(default_factory=list, description="name@vN of each input")
    params: dict[str, Any] = Field(default_factory=dict, description="everything the step was run with")
    arrow_schema: dict[str, str] = Field(default_factory=dict, description="column → Arrow type")
    inline_parts: list[PartInfo] = Field(default_factory=list, alias="parts")
    inline_quarantine: list[PartInfo] = Field(default_factory=list, alias="quarantine")
    parts_file: PartsFile | None = Field(None, description="format 2: the part list's file (no inline parts)")
    stats: DatasetStats = Field(default_factory=DatasetStats)

    # A format-2 part list: given (`with_parts`) or read from `_source` (store, version folder).
    _table: PartTable | None = PrivateAttr(None)
    _source: tuple[Store, str] | None = PrivateAttr(None)
    _lists: tuple[list[PartInfo], list[PartInfo]] | None = PrivateAttr(None)
    _inline_table: PartTable | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _one_part_list(self) -> "Manifest":
        if self.parts_file is not None and (self.format_version < 2 or self.inline_parts or self.inline_quarantine):
            raise ValueError("a manifest with a parts_file is format 2 and holds no inline parts")
        if self.parts_file is None and self.format_version >= 2:
            raise ValueError(f"format {self.format_version} manifest without a parts_file")
        return self

    @model_serializer(mode="wrap")
    def _without_empty_lists(self, handler):
        data = handler(self)
        if self.parts_file is not None:  # the list lives in the parts file, not here
            for key in ("parts", "quarantine", "inline_parts", "inline_quarantine"):
                data.pop(key, None)
        else:  # format 1 exactly as older code wrote it (its Manifest forbids unknown keys)
            data.pop("parts_file", None)
        return data

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> "Manifest":
        """As pydantic's, plus: ``parts``/``quarantine`` in ``update`` replace the part lists
        (the copy then holds them inline until it is committed)."""
        update = dict(update or {})
        lists = {f"inline_{k}": update.pop(k) for k in ("parts", "quarantine") if k in update}
        lists |= {k: update.pop(k) for k in ("inline_parts", "inline_quarantine") if k in update}
        if lists:
            update |= {"inline_parts": list(lists.get("inline_parts", self.parts)),
                       "inline_quarantine": list(lists.get("inline_quarantine", self.quarantine)),
                       "parts_file": None, "format_version": INLINE_FORMAT_VERSION}
        copied = super().model_copy(update=update, deep=deep)
        if lists:
            copied._table = copied._source = copied._lists = copied._inline_table = None
        return copied

    def __eq__(self, other: object) -> bool:
        # Fields only: where a part list was read from (a store object) is not part of the manifest.
        return isinstance(other, Manifest) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def with_parts(self, table: PartTable) -> "Manifest":
        """A copy whose part list is ``table`` (for writers of 10^6 parts: no pydantic object per part)."""
        copied = super().model_copy(update={"inline_parts": [], "inline_quarantine": [], "parts_file": None,
                                            "format_version": INLINE_FORMAT_VERSION})
        copied._table, copied._source, copied._lists, copied._inline_table = table, None, None, None
        return copied

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def id(self) -> str:
        """Stable identity of this committed version (used by readers to check what they resume)."""
        return f"{self.name}@v{self.version}:{self.job_id}"

    @property
    def part_count(self) -> int:
        """Parts, quarantine not included, without reading a part list."""
        if self.parts_file is not None:
            return self.parts_file.count
        return self._table.num_parts if self._table is not None else len(self.inline_parts)

    @property
    def quarantine_count(self) -> int:
        if self.parts_file is not None:
            return self.parts_file.quarantine
        return len(self._table) - self._table.num_parts if self._table is not None else len(self.inline_quarantine)

    def part_table(self) -> PartTable:
        """Every part (then quarantine part) as columns; a format-2 list is read (and checked) once."""
        if self._table is not None:
            return self._table
        if self.parts_file is None:
            if self._inline_table is None:
                self._inline_table = PartTable.of(self.inline_parts, self.inline_quarantine)
            return self._inline_table
        if self._source is None:
            raise RegistryError(f"{self.ref}: the manifest names part list {self.parts_file.path} but no store to read it from")
        self._table = read_part_list(*self._source, self.parts_file)
        return self._table

    def _part_lists(self) -> tuple[list[PartInfo], list[PartInfo]]:
        if self._table is None and self.parts_file is None:
            return self.inline_parts, self.inline_quarantine
        if self._lists is None:
            table = self.part_table()
            self._lists = table.infos(quarantine=False), table.infos(quarantine=True)
        return self._lists

    @property
    def parts(self) -> list[PartInfo]:
        return self._part_lists()[0]

    @property
    def quarantine(self) -> list[PartInfo]:
        return self._part_lists()[1]

    def parts_of(self, split: str | None = None) -> list[PartInfo]:
        return [p for p in self.parts if split is None or p.split == split]


def read_part_list(store: Store, folder: str, spec: PartsFile) -> PartTable:
    """A format-2 manifest's part list, checked against what its manifest records."""
    rel = f"{folder}/{spec.path}"
    where = store.uri(rel)
    try:
        data = store.read_bytes(rel)
    except FileNotFoundError:
        raise RegistryError(f"part list {where} is missing") from None
    sha = hashlib.sha256(data).hexdigest()
    if len(data) != spec.bytes or sha != spec.sha256:
        raise RegistryError(
            f"part list {where} does not match its manifest: {len(data):,} bytes, sha256 {sha[:12]}… "
            f"(manifest: {spec.bytes:,} bytes, sha256 {spec.sha256[:12]}…)"
        )
    table = PartTable.from_parquet(data, where)
    if (table.num_parts, len(table) - table.num_parts) != (spec.count, spec.quarantine):
        raise RegistryError(f"part list {where} holds {table.num_parts} parts and {len(table) - table.num_parts} "
                            f"quarantine parts, its manifest says {spec.count} and {spec.quarantine}")
    return table


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Package version, plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+g{sha}" if sha else __version__


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise RegistryError(
            f"invalid name {name!r}: use letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` → (name, None) meaning latest; ``name@v3`` or ``name@3`` → (name, 3)."""
    m = _REF_RE.match(ref.strip())
    if not m:
        raise RegistryError(f"invalid reference {ref!r}: expected NAME or NAME@vN")
    version = m.group("version")
    return check_name(m.group("name")), int(version) if version else None


def area_of(kind: str) -> str:
    return "models" if kind in MODEL_KINDS else "datasets"


class Registry:
    """Manifests on a store. All state is read from the store; nothing is cached across calls."""

    def __init__(self, store: Store):
        self.store = store

    def dataset_dir(self, name: str, area: str = "datasets") -> str:
        return f"{area}/{check_name(name)}"

    def job_dir(self, name: str, job_id: str, area: str = "datasets") -> str:
        return f"{self.dataset_dir(name, area)}/_jobs/{job_id}"

    def versions(self, name: str, area: str = "datasets") -> list[int]:
        """Committed versions. A version folder without its manifest is a commit in flight (or
        one that crashed before its manifest landed, on a local disk) and does not count."""
        found = []
        for entry in self.store.list(self.dataset_dir(name, area)):
            m = _VERSION_DIR_RE.match(entry.rsplit("/", 1)[-1])
            if m and self.store.exists(self.manifest_path(name, int(m.group(1)), area)):
                found.append(int(m.group(1)))
        return sorted(found)

    def names(self, area: str = "datasets") -> list[str]:
        return sorted(e.rsplit("/", 1)[-1] for e in self.store.list(area))

    def version_dir(self, name: str, version: int, area: str = "datasets") -> str:
        return f"{self.dataset_dir(name, area)}/v{version:04d}"

    def manifest_path(self, name: str, version: int, area: str = "datasets") -> str:
        return f"{self.version_dir(name, version, area)}/manifest.json"

    def load(self, name: str, version: int, area: str = "datasets") -> Manifest:
        path = self.manifest_path(name, version, area)
        try:
            raw = self.store.read_bytes(path)
        except FileNotFoundError:
            raise RegistryError(f"no manifest at {self.store.uri(path)}") from None
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValueError as e:
            # A newer format may not validate here at all: say that rather than what failed.
            found = _FORMAT_RE.search(raw)
            if found and int(found.group(1)) > FORMAT_VERSION:
                raise RegistryError(_too_new(f"{name}@v{version}", int(found.group(1)), self.store.uri(path))) from None
            raise RegistryError(f"unreadable manifest {self.store.uri(path)}: {e}") from None
        if manifest.format_version > FORMAT_VERSION:
            raise RegistryError(_too_new(f"{name}@v{version}", manifest.format_version, self.store.uri(path)))
        manifest._source = (self.store, self.version_dir(name, version, area))
        return manifest

    def resolve(self, ref: str, area: str = "datasets", kind: str | tuple[str, ...] | None = None) -> Manifest:
        """The manifest a reference names; ``kind`` (one or several) is checked when given."""
        name, version = parse_ref(ref)
        versions = self.versions(name, area)
        if not versions:
            known = ", ".join(self.names(area)) or "none"
            raise RegistryError(f"no {area[:-1]} named {name!r} in {self.store.url} (known: {known})")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            listed = ", ".join(f"v{v}" for v in versions)
            raise RegistryError(f"{name}@v{version} does not exist (versions: {listed})")
        manifest = self.load(name, version, area)
        kinds = (kind,) if isinstance(kind, str) else kind
        if kinds and manifest.kind not in kinds:
            raise RegistryError(f"{manifest.ref} is a {manifest.kind} dataset, expected {' or '.join(kinds)}")
        return manifest

    def resolve_any(self, ref: str) -> Manifest:
        """A dataset reference, or failing that a model reference (the dataset's error if neither)."""
        try:
            return self.resolve(ref)
        except RegistryError as first:
            try:
                return self.resolve(ref, area="models")
            except RegistryError:
                raise first from None

    def find_job(self, name: str, job_id: str, area: str = "datasets") -> Manifest | None:
        """The committed version made by this exact job, if any (a rerun then reuses it)."""
        for v in reversed(self.versions(name, area)):
            m = self.load(name, v, area)
            if m.job_id == job_id:
                return m
        return None

    def commit(self, manifest: Manifest) -> Manifest:
        """Publish the manifest as the next free version; returns it with its version set."""
        area = area_of(manifest.kind)
        versions = self.versions(manifest.name, area)
        if versions:
            latest = self.load(manifest.name, versions[-1], area)
            if latest.job_id == manifest.job_id:
                return latest  # this job was committed already (e.g. by a concurrent rerun)
        version = (versions[-1] if versions else 0) + 1
        table = manifest.part_table()
        if len(table) <= INLINE_PARTS:
            manifest = manifest.model_copy(update={"parts": manifest.parts, "quarantine": manifest.quarantine})
            listing = None
        else:
            listing = table.to_parquet()
            digest = hashlib.sha256(listing).hexdigest()
            # Named by content: two writers racing for one version folder never share a file name
            # unless they share the bytes too.
            spec = PartsFile(path=f"parts-{digest[:16]}.parquet", count=table.num_parts,
                             quarantine=len(table) - table.num_parts, bytes=len(listing), sha256=digest)
            # pydantic's own copy: ours would take new inline lists for an inline manifest
            manifest = BaseModel.model_copy(manifest, update={
                "format_version": 2, "inline_parts": [], "inline_quarantine": [], "parts_file": spec})
            manifest._table = table
        while True:
            candidate = BaseModel.model_copy(manifest, update={"version": version})
            folder = self.version_dir(manifest.name, version, area)
            if listing is not None:
                self.store.put_if_absent(f"{folder}/{spec.path}", listing)  # the list before its manifest
            data = candidate.model_dump_json(indent=2).encode()
            if self.store.put_if_absent(self.manifest_path(manifest.name, version, area), data):
                candidate._source = (self.store, folder)
                return candidate
            # Lost the race for this version: the other writer keeps it. If it was a rerun of
            # this very job, its result is ours too, and a second version would be a duplicate.
            winner = self.load(manifest.name, version, area)
            if winner.job_id == manifest.job_id:
                return winner
            if listing is not None and (winner.parts_file is None or winner.parts_file.path != spec.path):
                self.store.delete(f"{folder}/{spec.path}")  # ours, and no manifest names it
            version += 1

    def list(self) -> list[Manifest]:
        """The latest manifest of every dataset and model."""
        out = []
        for area in ("datasets", "models"):
            for name in self.names(area):
                versions = self.versions(name, area)
                if versions:
                    out.append(self.load(name, versions[-1], area))
        return out

    def part_path(self, manifest: Manifest, part: PartInfo | str) -> str:
        """A part's path from the store root (``part``: its `PartInfo` or its path in the manifest)."""
        return f"{self.dataset_dir(manifest.name, area_of(manifest.kind))}/{part if isinstance(part, str) else part.path}"

    def read_part(self, manifest: Manifest, part: PartInfo) -> bytes:
        """A small part whole (a model's files), checked against the sha256 its manifest records."""
        rel = self.part_path(manifest, part)
        try:
            data = self.store.read_bytes(rel)
        except FileNotFoundError:
            raise RegistryError(f"{manifest.ref}: file {self.store.uri(rel)} is missing") from None
        if hashlib.sha256(data).hexdigest() != part.sha256:
            raise RegistryError(
                f"{manifest.ref}: {self.store.uri(rel)} does not match the sha256 in its manifest (corrupt or replaced)"
            )
        return data


def _too_new(ref: str, found: int, where: str) -> str:
    return (f"{ref}: manifest format version {found} is newer than this blt-data ({__version__}) reads "
            f"(up to {FORMAT_VERSION}); upgrade blt-data to read {where}")


def job_hash(payload: dict[str, Any]) -> str:
    """Job id: a hash of a step's inputs and parameters (stable JSON)."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Garbage:
    """Job files that no manifest references (`registry gc`)."""

    job_dir: str  # relative to the store root
    files: tuple[str, ...]
    bytes: int
    reason: str
    whole_job: bool  # every file of the job folder is garbage


def find_garbage(registry: Registry, older_than_s: float, now: float) -> list[Garbage]:
    """Job files no committed manifest references, per job folder.

    A committed job's leftovers (completion records, shuffle runs, earlier checkpoints) go at
    once: a rerun of that job finds its manifest and never reads them. A job without a
    manifest may be running (a training run writes a checkpoint every few hours), so its
    folder goes only when nothing in it changed for `older_than_s` seconds.
    """
    out = []
    for area in ("datasets", "models"):
        for name in registry.names(area):
            base = registry.dataset_dir(name, area)
            manifests = [registry.load(name, v, area) for v in registry.versions(name, area)]
            referenced = {f"{base}/{p}" for m in manifests for p in m.part_table().paths()}
            committed = {m.job_id for m in manifests}
            jobs: dict[str, list[tuple[str, int, float]]] = {}
            for path, size, modified in registry.store.find_detail(f"{base}/_jobs"):
                job = path[len(base) + len("/_jobs/"):].split("/", 1)[0]
                jobs.setdefault(job, []).append((path, size, modified))
            for job, entries in sorted(jobs.items()):
                loose = [(p, n) for p, n, _ in entries if p not in referenced]
                if not loose:
                    continue
                if job in committed:
                    reason = f"left over by job {job}, committed in {name}"
                else:
                    idle = now - max(m for _, _, m in entries)
                    if idle < older_than_s:
                        continue
                    reason = f"job {job} of {name} has no manifest and wrote nothing for {idle / 3600:.1f} h"
                out.append(Garbage(f"{base}/_jobs/{job}", tuple(p for p, _ in loose), sum(n for _, n in loose),
                                   reason, len(loose) == len(entries)))
    return out


def delete_garbage(registry: Registry, garbage: list[Garbage]) -> None:
    for g in garbage:
        if g.whole_job:
            registry.store.delete(g.job_dir, recursive=True)
        else:
            for path in g.files:
                registry.store.delete(path)
