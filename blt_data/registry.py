"""The dataset registry: immutable, versioned manifests on a store (DESIGN.md §5).

Layout under the store root::

    datasets/<name>/v<NNNN>/manifest.json             immutable, written last, put-if-absent
    datasets/<name>/_jobs/<job-id>/part-<unit>.*      parts, written first
    models/<name>/v<NNNN>/manifest.json               written last, put-if-absent
    models/<name>/_jobs/<job-id>/{model.safetensors, config.json}
                                                      model files listed as the manifest's parts
    models/<name>/_jobs/<job-id>/checkpoints/step-<N>/   training checkpoints (blt_model.checkpoint)

Invariant: nothing exists until its manifest does. Parts are written first under the job's
folder; the manifest is created last with put-if-absent, so of two writers racing for one
version exactly one wins and the other moves on to the next version.
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

from pydantic import BaseModel, ConfigDict, Field, field_validator

from blt_data import __version__
from blt_data.stats import DatasetStats
from blt_data.storage import Store

FORMAT_VERSION = 1
Kind = Literal["documents", "patches", "entropy-model", "blt-checkpoint"]
MODEL_KINDS = ("entropy-model", "blt-checkpoint")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REF_RE = re.compile(r"^(?P<name>[^@]+)(?:@v?(?P<version>\d+))?$")
_VERSION_DIR_RE = re.compile(r"^v(\d{4,})$")


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


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    name: str
    version: int = 0  # assigned at commit
    kind: Kind
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    code_version: str = Field(default_factory=lambda: code_version())
    job_id: str
    parents: list[str] = Field(default_factory=list, description="name@vN of each input")
    params: dict[str, Any] = Field(default_factory=dict, description="everything the step was run with")
    arrow_schema: dict[str, str] = Field(default_factory=dict, description="column → Arrow type")
    parts: list[PartInfo] = Field(default_factory=list)
    quarantine: list[PartInfo] = Field(default_factory=list)
    stats: DatasetStats = Field(default_factory=DatasetStats)

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    @property
    def id(self) -> str:
        """Stable identity of this committed version (used by readers to check what they resume)."""
        return f"{self.name}@v{self.version}:{self.job_id}"

    def parts_of(self, split: str | None = None) -> list[PartInfo]:
        return [p for p in self.parts if split is None or p.split == split]


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

    def manifest_path(self, name: str, version: int, area: str = "datasets") -> str:
        return f"{self.dataset_dir(name, area)}/v{version:04d}/manifest.json"

    def load(self, name: str, version: int, area: str = "datasets") -> Manifest:
        path = self.manifest_path(name, version, area)
        try:
            raw = self.store.read_bytes(path)
        except FileNotFoundError:
            raise RegistryError(f"no manifest at {self.store.uri(path)}") from None
        try:
            return Manifest.model_validate_json(raw)
        except ValueError as e:
            raise RegistryError(f"unreadable manifest {self.store.uri(path)}: {e}") from None

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
        while True:
            candidate = manifest.model_copy(update={"version": version})
            data = candidate.model_dump_json(indent=2).encode()
            if self.store.put_if_absent(self.manifest_path(manifest.name, version, area), data):
                return candidate
            # Lost the race for this version: the other writer keeps it. If it was a rerun of
            # this very job, its result is ours too, and a second version would be a duplicate.
            winner = self.load(manifest.name, version, area)
            if winner.job_id == manifest.job_id:
                return winner
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

    def part_path(self, manifest: Manifest, part: PartInfo) -> str:
        return f"{self.dataset_dir(manifest.name, area_of(manifest.kind))}/{part.path}"


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
            referenced = {f"{base}/{p.path}" for m in manifests for p in (*m.parts, *m.quarantine)}
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
