"""``blt-data patch``: a documents dataset -> a patches dataset, as a Ray program (DESIGN.md §6).

    input manifest -> plan units (driver) -> [calibrate threshold on a sample (one actor)]
        -> pool of PatchWorker actors: read unit, score entropies, patch, write part + record
        -> driver: ray.wait, record (compacting records by 100 and 10,000 units), retry -> commit

Per-unit overhead (a few ms; bench/units.py measures it): each actor has two calls queued, so
it never waits for the driver between units, and works through runs of consecutive units, so
it reads each input part through once (a part is one zstd frame). The plan is stored in the job
folder once (``plan.json``) and completion records are compacted (``patch_units.Completion``),
so a restart reads neither the input nor one object per unit (bench/units.py: 10^6 done units
in under 5 s, local disk or loopback S3).

Commit order (the invariant): each unit's Parquet part is published whole, then its completion
record (``blt_data.patch_units``); the manifest is created last, with put-if-absent, only when
every unit has a record. A rerun of the same job (same job id) skips every unit with a record,
so killing the driver and starting it again recomputes nothing that finished, and its result
is the same bytes as an uninterrupted run's.

The job id hashes what decides the output: the input manifest id, the model's sha256 and the
config's output fields (``blt_data.jobs``): the patch rule (with the *target* patch size, not the
calibrated threshold), whether entropies are stored, the unit size and minimum unit count, the
scoring row length and precision, and the plan's version. Workers, device, batch sizes and
retries are execution fields, so a job started on a laptop can be finished on a GPU cluster (with ``dtype`` set explicitly: ``auto`` means fp32 on
CPU and bf16 on GPU, two different outputs). The calibrated threshold is itself output: it is
stored once in the job folder (``calibration.json``, put-if-absent) and every later run reuses it.

Where it runs is configuration alone: without ``ray_address`` a local Ray on this machine's CPUs
(or a Ray already initialised in this process, e.g. a test session's); with one, a cluster.
Workers get the store's non-secret settings (endpoint, region) through the runtime env;
credentials come from the workers' own environment or instance role, never from this program.

Length: the job's config, plan, actor pool and scheduling loop with its failure handling; they
share the job id and the commit order, and none is used elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
from functools import partial
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from blt_data import patch_units
from blt_data.calibrate import Calibration, CalibrationSample, calibrated
from blt_data.jobs import EXECUTION, output_fields
from blt_data.patch_units import (
    PLAN_VERSION, Completion, PartReader, Unit, UnitRecord, UnitSpec, calibration_sample, commit_patches, load_plan,
    patch_unit, plan_units, save_plan, unit_size,
)
from blt_data.patches import FORMAT_VERSION
from blt_data.patching import ENTROPY_SCHEMES, PatchRule
from blt_data.registry import Manifest, PartInfo, Registry, check_name, job_hash
from blt_data.shuffle import chunk_parts
from blt_data.storage import Store

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"  # the shipped model (blt_model.entropy_registry.DEFAULT_MODEL)
RECORDED_RULE_FILE = "patching.json"  # beside the shipped model: the threshold it was calibrated for
RULE_OPTIONS = "threshold (--threshold) and target_patch_size (--target-patch-size)"
# Store settings the workers need and that are safe to pass along (no credentials).
STORE_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "BLT_STORE")


class PatchJobError(RuntimeError):
    """A unit failed more often than allowed, or the job cannot run as configured."""


class FaultInjection(BaseModel):
    """Testing only: make attempts 0..attempts-1 of one unit fail inside the worker."""

    model_config = ConfigDict(extra="forbid")
    unit: int = Field(ge=0)
    kind: Literal["exit", "raise"] = Field("exit", description="exit: the worker process dies mid-unit (os._exit); raise: an exception")
    attempts: int = Field(1, ge=1)


class PatchJobConfig(BaseModel):
    """Everything `blt-data patch` runs with. Fields marked EXECUTION stay out of the job id."""

    model_config = ConfigDict(extra="forbid")

    docs: str = Field(description="input documents dataset: NAME or NAME@vN")
    name: str = Field(description="name of the patches dataset to create")
    model: str | None = Field(None, description="entropy model: 'default' (shipped) or NAME[@vN]; entropy schemes default to 'default', other schemes score only when given")
    rule: PatchRule = Field(default_factory=PatchRule, description="the patch rule")
    entropies: bool = Field(True, description="store the entropies column when the job scores")
    chunks: list[int] | None = Field(None, description="patch only these train chunks of a shuffled dataset (and all of val); None: everything")
    unit_bytes: int = Field(16 * 10**6, ge=1024, le=1 << 30, description="input bytes (JSON lines) per unit of work")
    min_units: int = Field(64, ge=1, description="on a small input, smaller units (down to 64 KiB) to make at least this many, so no worker idles")
    row_len: int | None = Field(None, ge=1, description="scoring row length in tokens; None: the model's max_seqlen")
    batch_rows: int = Field(8, ge=1, description="rows per scoring batch (results do not depend on it: batch invariance)", json_schema_extra=EXECUTION)
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="scoring precision; auto: bf16 on GPU, fp32 on CPU")
    workers: int = Field(2, ge=1, description="scoring actors", json_schema_extra=EXECUTION)
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per actor; > 0 scores on CUDA", json_schema_extra=EXECUTION)
    cpus_per_worker: float = Field(0.5, gt=0, description="Ray CPUs per actor; fractional so a pool never starves the rest", json_schema_extra=EXECUTION)
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads per actor; None: max(1, cpus_per_worker)", json_schema_extra=EXECUTION)
    ray_address: str | None = Field(None, description="Ray cluster to join; None: a local Ray (either way, a Ray already initialised in this process is used as it is)", json_schema_extra=EXECUTION)
    local_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray; None: this machine's", json_schema_extra=EXECUTION)
    retries: int = Field(3, ge=0, description="attempts after the first before the job fails", json_schema_extra=EXECUTION)
    fault: FaultInjection | None = Field(None, description="testing: inject a failure into one unit", json_schema_extra=EXECUTION)

    @model_validator(mode="after")
    def _rule_is_complete(self) -> "PatchJobConfig":
        check_name(self.name)
        if self.rule.scheme != "entropy":  # `entropy` may take the threshold recorded with its model
            self.rule.require_threshold_or_target(RULE_OPTIONS)
        return self

    @property
    def model_ref(self) -> str | None:
        """The model actually used: None when nothing needs scoring."""
        if self.rule.scheme in ENTROPY_SCHEMES:
            return self.model or DEFAULT_MODEL
        return self.model if self.entropies else None

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_worker > 0 else "cpu"

    @property
    def resolved_dtype(self) -> str:
        if self.dtype == "auto":
            return "bf16" if self.device == "cuda" else "fp32"
        return self.dtype


class ModelInfo(BaseModel):
    ref: str  # "default" or NAME@vN
    sha256: str


def with_recorded_threshold(registry: Registry, cfg: PatchJobConfig) -> PatchJobConfig:
    """The config as it runs: the `entropy` scheme with neither a threshold nor a target patch
    size takes the threshold recorded with its model (the same job as giving it explicitly)."""
    rule = cfg.rule
    if rule.scheme != "entropy" or rule.threshold is not None or rule.target_patch_size is not None:
        return cfg
    model = resolve_model(registry, cfg.model_ref)
    threshold = recorded_threshold(registry, model)
    if threshold is None:
        raise PatchJobError(f"scheme 'entropy' needs exactly one of {RULE_OPTIONS}: model {model.ref} records no threshold")
    return cfg.model_copy(update={"rule": rule.model_copy(update={"threshold": threshold})})


def recorded_threshold(registry: Registry, model: ModelInfo) -> float | None:
    """The `entropy` scheme's threshold (nats) recorded with a model: beside the shipped one
    (``patching.json``), in a registered one's manifest params; None when it records none."""
    if model.ref == DEFAULT_MODEL:
        from blt_model.entropy_registry import DEFAULT_MODEL_DIR

        return json.loads((DEFAULT_MODEL_DIR / RECORDED_RULE_FILE).read_text())["threshold"]
    return registry.resolve(model.ref, area="models").params.get("threshold")


@dataclass
class PatchPlan:
    """What a job will do, before it does anything (``--dry-run`` prints this)."""

    config: PatchJobConfig
    docs: Manifest
    model: ModelInfo | None
    job_id: str
    units: list[Unit]
    spec: UnitSpec  # patch.threshold is None until calibrated when a target is set
    unit_size: int  # bytes per unit as planned (unit_bytes, or less on a small input)
    stored: bool  # the plan was read from the job folder (else it was made now and is not saved yet)

    def summary(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "input": self.docs.ref,
            "model": self.model.model_dump() if self.model else None,
            "config": self.config.model_dump(mode="json"),
            "num_units": len(self.units),
            "unit_size": self.unit_size,
            "bytes": sum(u.bytes for u in self.units),
            "units": [
                {"index": u.index, "part": u.part, "lines": [u.start, u.stop], "bytes": u.bytes} for u in self.units
            ],
        }


def resolve_model(registry: Registry, ref: str) -> ModelInfo:
    if ref == DEFAULT_MODEL:
        from blt_model.entropy_model import WEIGHTS_FILE
        from blt_model.entropy_registry import DEFAULT_MODEL_DIR

        path = DEFAULT_MODEL_DIR / WEIGHTS_FILE
        if not path.exists():
            raise FileNotFoundError(f"the shipped entropy model is missing from {DEFAULT_MODEL_DIR}")
        return ModelInfo(ref=DEFAULT_MODEL, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    manifest = registry.resolve(ref, area="models", kind="entropy-model")
    return ModelInfo(ref=manifest.ref, sha256=manifest.params["sha256"])


def _job_payload(cfg: PatchJobConfig, docs: Manifest, model: ModelInfo | None) -> dict[str, Any]:
    """Everything that decides the output, and nothing that only decides how it is computed
    (the config's EXECUTION fields: workers, device, batch sizes, retries)."""
    fields = output_fields(cfg, exclude={"docs", "model", "name"})
    if model:  # "auto" is another precision on another device
        fields["dtype"] = cfg.resolved_dtype
    # The parts' format too: a job begun by code that wrote another format must not be finished
    # with parts of this one.
    return {"step": "patch", "input": docs.id, "model_sha256": model.sha256 if model else None, "config": fields,
            "format": FORMAT_VERSION, "plan": PLAN_VERSION}


def _scoring(cfg: PatchJobConfig, model: ModelInfo | None) -> dict[str, Any] | None:
    """How this run scored (recorded in the manifest, not part of the job id)."""
    if model is None:
        return None
    return {"row_len": cfg.row_len, "batch_rows": cfg.batch_rows, "device": cfg.device, "dtype": cfg.resolved_dtype}


def plan_patch_job(registry: Registry, cfg: PatchJobConfig) -> PatchPlan:
    """Resolve the inputs, compute the job id and list the units (the job folder's stored plan
    if it has one, else read from the input); writes nothing."""
    cfg, docs, model, spec, parts = resolve_job(registry, cfg)
    size = unit_size(cfg.unit_bytes, docs, parts, cfg.min_units)
    units = load_plan(registry.store, spec.job_dir)
    stored = units is not None
    if units is None:
        units = plan_units(registry, docs, size, parts)
    return PatchPlan(config=cfg, docs=docs, model=model, job_id=spec.job_id, units=units, spec=spec, unit_size=size, stored=stored)


def resolve_job(registry: Registry, cfg: PatchJobConfig) -> tuple[PatchJobConfig, Manifest, ModelInfo | None, UnitSpec, list[PartInfo]]:
    """The config as it runs, its input manifest and model, the units' shared spec (with the job
    id) and the input parts the job patches: everything but the units."""
    cfg = with_recorded_threshold(registry, cfg)
    docs = registry.resolve(cfg.docs, kind="documents")
    model = resolve_model(registry, cfg.model_ref) if cfg.model_ref else None
    job_id = job_hash(_job_payload(cfg, docs, model))
    spec = UnitSpec(
        input_dir=registry.dataset_dir(docs.name),
        output_dir=registry.dataset_dir(cfg.name),
        name=cfg.name,
        job_id=job_id,
        patch=cfg.rule,
        # Format 2: the end-of-document entropy is kept whenever the entropies are.
        keep_entropies=(keep := bool(model) and cfg.entropies),
        keep_eos_entropy=keep,
    )
    try:
        parts = chunk_parts(docs, cfg.chunks)
    except ValueError as e:
        raise PatchJobError(str(e)) from None
    return cfg, docs, model, spec, parts


class PatchWorker:
    """A Ray actor: loads the entropy model once, then patches units and scores samples.

    The driver never sees documents: the worker reads its unit from the store and writes the
    part and the completion record itself, returning only the (small) record.
    """

    def __init__(self, store_url: str, model: ModelInfo | None, cfg: PatchJobConfig):
        self.store = Store.open(store_url)
        self.cfg = cfg
        self.reader: PartReader | None = None  # kept across units, so consecutive units read their part once
        self.model = None
        if model is not None:
            import torch

            from blt_model.entropy_registry import DEFAULT_MODEL_DIR, load_entropy_model_ref

            torch.set_num_threads(cfg.threads_per_worker or max(1, int(cfg.cpus_per_worker)))
            if model.ref == DEFAULT_MODEL:  # registered models are checked against their manifest on load
                found = hashlib.sha256((DEFAULT_MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()
                if found != model.sha256:
                    raise PatchJobError(f"this worker's shipped model has sha256 {found[:12]}…, the job expects {model.sha256[:12]}…")
            self.model = load_entropy_model_ref(Registry(self.store), model.ref, device=cfg.device)

    def _score(self, texts: list[str], eos: bool = False):
        import torch

        from blt_data.entropy import score_entropies

        dtype = torch.bfloat16 if self.cfg.resolved_dtype == "bf16" else torch.float32
        return score_entropies(
            self.model, texts, row_len=self.cfg.row_len, batch_rows=self.cfg.batch_rows,
            device=self.cfg.device, dtype=dtype, eos=eos,
        )

    def score(self, texts: list[str]) -> list[np.ndarray]:
        """float16 entropies of each text (for calibration)."""
        return [e.astype(np.float16) for e in self._score(texts)]

    def run(self, unit: Unit, spec: UnitSpec, attempt: int) -> UnitRecord:
        score = partial(self._score, eos=spec.keep_eos_entropy) if self.model is not None else None
        fault = self.cfg.fault
        if fault is not None and fault.unit == unit.index and attempt < fault.attempts:
            if fault.kind == "raise":
                raise RuntimeError(f"injected fault in unit {unit.index}, attempt {attempt}")
            score = _dying(score)
        if self.reader is None or self.reader.input_dir != spec.input_dir:
            self.reader = PartReader(self.store, spec.input_dir)
        return patch_unit(self.store, unit, spec, score, self.reader)


def _dying(score):
    """A scoring function whose process exits (a real death, no cleanup) after one document."""

    def run(texts):
        if score is not None:
            for _ in score(texts):
                break
        os._exit(1)

    return run


class _Pool:
    """The actors, replaced one by one when their process dies."""

    def __init__(self, size: int, store_url: str, model: ModelInfo | None, cfg: PatchJobConfig):
        env = {k: os.environ[k] for k in STORE_ENV_VARS if os.environ.get(k)}
        worker = ray.remote(PatchWorker)
        # SPREAD: one actor per node before two on any node, so a cluster's nodes all score
        # and losing one node loses the fewest actors.
        self._new = lambda: worker.options(
            num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, scheduling_strategy="SPREAD",
            runtime_env={"env_vars": env} if env else None,
        ).remote(store_url, model, cfg)
        self.actors = [self._new() for _ in range(size)]

    def replace(self, slot: int) -> None:
        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new()

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def check_ray_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once on a cluster address that answers nothing: `ray.init` itself retries for
    minutes (measured: over 5 minutes on a closed port) before it gives up."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise PatchJobError(f"Ray address {address!r} is not HOST:PORT (or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise PatchJobError(f"cannot reach Ray at {address}: {e.strerror or e}") from None


def _connect(cfg: PatchJobConfig) -> bool:
    """Join the configured Ray; True if this call started it (and so must shut it down)."""
    if ray.is_initialized():
        return False
    # Inside a Ray job (`blt-data submit`, a KubeRay RayJob) Ray names its cluster in
    # RAY_ADDRESS: join it; resources are the cluster's, not ours to declare.
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_reachable(address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        cpus = max(cfg.local_cpus or os.cpu_count() or 1, math.ceil(cfg.workers * cfg.cpus_per_worker))
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def _error_text(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"


def _calibration_sample(registry: Registry, plan: PatchPlan, pool: _Pool, scored: dict, num: int | None) -> CalibrationSample:
    """Entropies of the first ``num`` documents of the calibration draw (None: its default size),
    scored by every actor on a share of about equal size (an actor that dies is replaced and its
    share scored again). ``scored`` keeps them by (part, line) for a larger draw to reuse."""
    cfg = plan.config
    texts, population = calibration_sample(
        registry.store, plan.spec.input_dir, plan.units, cfg.rule.calibration_bytes, cfg.rule.calibration_seed, num
    )
    keys = [k for k in texts if k not in scored]
    log.info("calibration: scoring %d documents (%.2f MB; %d drawn) on %d actors", len(keys),
             sum(len(texts[k]) for k in keys) / 1e6, len(texts), len(pool.actors))
    ends = np.cumsum([len(texts[k]) for k in keys])
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, len(pool.actors)) / len(pool.actors)) if keys else []
    shares = [keys[a:b] for a, b in zip([0, *cuts], [*cuts, len(keys)])]
    done = [False] * len(shares)
    for attempt in range(cfg.retries + 1):
        refs = {pool.actors[i].score.remote([texts[k] for k in share]): i for i, share in enumerate(shares) if not done[i]}
        for ref, i in refs.items():
            try:
                scored.update(zip(shares[i], ray.get(ref)))
                done[i] = True
            except ray.exceptions.RayActorError:
                pool.replace(i)
        if all(done):
            return CalibrationSample([scored[k] for k in texts], population)
    raise PatchJobError("the workers scoring the calibration sample kept dying")


IN_FLIGHT = 2  # calls queued on each actor: it starts its next unit without waiting for the driver


class _Schedule:
    """Which unit each actor does next.

    Units go out in runs: consecutive units of one input part, taken from the head of the plan,
    so an actor's ``PartReader`` reads through a part once; an actor whose run is done takes the
    next run, or, when none is left, the back half of the longest run another actor holds.
    Runs are short enough (at most a quarter of the first compaction level, shared by the
    actors) that units finish roughly in plan order: a block or two of records are loose at any
    time, which bounds what a restart reads. A unit to retry goes first to an actor it has not
    failed on; to the one it failed on only when nothing else is left for that actor.
    """

    def __init__(self, todo: list[Unit], slots: int):
        cap = max(1, patch_units.BATCH_LEVELS[0] // (4 * slots))
        self.runs: deque[deque[Unit]] = deque()
        for unit in todo:
            last = self.runs[-1][-1] if self.runs else None
            if last is None or len(self.runs[-1]) >= cap or unit.part != last.part or unit.index != last.index + 1:
                self.runs.append(deque())
            self.runs[-1].append(unit)
        self.held: list[deque[Unit]] = [deque() for _ in range(slots)]
        self.retry: deque[tuple[Unit, int]] = deque()  # (unit, slot it last failed on)

    def next(self, slot: int) -> Unit | None:
        for i, (unit, failed_on) in enumerate(self.retry):
            if failed_on != slot:
                del self.retry[i]
                return unit
        run = self.held[slot]
        if not run and self.runs:
            self.held[slot] = run = self.runs.popleft()
        if not run:
            other = max(self.held, key=len)
            for _ in range((len(other) + 1) // 2):
                run.appendleft(other.pop())
        if run:
            return run.popleft()
        if self.retry:
            return self.retry.popleft()[0]
        return None

    def put_back(self, slot: int, units: list[Unit]) -> None:
        """Units an actor had queued when it died: its replacement does them next, in order."""
        self.held[slot].extendleft(reversed(units))


def _run_units(plan: PatchPlan, spec: UnitSpec, todo: list[Unit], pool: _Pool, bar: tqdm, done: Completion) -> None:
    """Keep every actor busy until each unit has a record; retry failures on another actor."""
    cfg = plan.config
    schedule = _Schedule(todo, len(pool.actors))
    running: dict[ray.ObjectRef, tuple[Unit, int]] = {}
    queued: list[deque[ray.ObjectRef]] = [deque() for _ in pool.actors]  # per actor, in submission order
    failures: Counter[int] = Counter()

    def submit(slot: int) -> None:
        while len(queued[slot]) < IN_FLIGHT and (unit := schedule.next(slot)) is not None:
            ref = pool.actors[slot].run.remote(unit, spec, failures[unit.index])
            running[ref] = (unit, slot)
            queued[slot].append(ref)

    def finished(ref: ray.ObjectRef, record: UnitRecord) -> None:
        unit, slot = running.pop(ref)
        queued[slot].remove(ref)
        done.add(record)  # compacts what the unit completes
        bar.set_postfix(units=f"{len(done)}/{len(plan.units)}", refresh=False)
        bar.update(unit.bytes)

    def failed(unit: Unit, slot: int, error: Exception) -> None:
        failures[unit.index] += 1
        if failures[unit.index] > cfg.retries:
            raise PatchJobError(
                f"unit {unit.index} ({unit.part}, lines {unit.start}-{unit.stop}) failed {failures[unit.index]} "
                f"times; last error: {_error_text(error)}"
            )
        schedule.retry.append((unit, slot))

    for slot in range(len(pool.actors)):
        submit(slot)
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        unit, slot = running[ref]
        try:
            finished(ref, ray.get(ref))
        except ray.exceptions.RayActorError:
            # The process died. Its calls ran in submission order: those that finished keep
            # their records, the oldest other one was running (it is the one that failed), and
            # the ones after it never started: they go back to the new actor.
            lost: list[Unit] = []
            culprit: tuple[Unit, Exception] | None = None
            for old in list(queued[slot]):
                try:
                    finished(old, ray.get(old))
                    continue
                except ray.exceptions.RayError as e:
                    old_unit, _ = running.pop(old)
                    if culprit is None:
                        culprit = (old_unit, e)
                    else:
                        lost.append(old_unit)
            queued[slot].clear()
            assert culprit is not None
            log.warning("worker of unit %d died (%s); replacing it", culprit[0].index, _error_text(culprit[1]))
            pool.replace(slot)
            schedule.put_back(slot, lost)
            failed(culprit[0], slot, culprit[1])
        except ray.exceptions.RayError as e:  # the unit raised; the actor lives on
            running.pop(ref)
            queued[slot].remove(ref)
            log.warning("unit %d failed: %s", unit.index, _error_text(e))
            failed(unit, slot, e)
        for s in range(len(pool.actors)):
            submit(s)


def run_patch_job(registry: Registry, cfg: PatchJobConfig, progress: bool = False) -> Manifest:
    """Run (or resume, or reuse) a patch job; returns the committed manifest."""
    plan = plan_patch_job(registry, cfg)
    cfg = plan.config
    existing = registry.find_job(cfg.name, plan.job_id)
    if existing is not None:
        log.info("%s was already made by job %s; reusing it", existing.ref, plan.job_id)
        return existing
    spec = plan.spec
    done = load_completion(registry, plan)
    todo = [u for u in plan.units if u.index not in done]
    calibration = None
    needs_calibration = cfg.rule.target_patch_size is not None
    if todo or needs_calibration:
        store_url = registry.store.root if registry.store.is_local else registry.store.url
        started = _connect(cfg)
        pool = _Pool(max(1, min(cfg.workers, len(todo))), store_url, plan.model, cfg)
        try:
            rule, calibration = calibrated(registry.store, spec.job_dir, cfg.rule, partial(_calibration_sample, registry, plan, pool, {}))
            spec = spec.model_copy(update={"patch": rule})
            if len(done):
                log.info("resuming job %s: %d of %d units done", plan.job_id, len(done), len(plan.units))
            total = sum(u.bytes for u in plan.units)
            with tqdm(
                total=total, initial=total - sum(u.bytes for u in todo), unit="B", unit_scale=True, unit_divisor=1000,
                desc=f"patch {cfg.name}", disable=not progress, dynamic_ncols=True,
            ) as bar:
                bar.set_postfix(units=f"{len(done)}/{len(plan.units)}")
                _run_units(plan, spec, todo, pool, bar, done)
        finally:
            pool.close()
            if started:
                ray.shutdown()
    return _commit(registry, plan, spec, done, calibration)


def load_completion(registry: Registry, plan: PatchPlan) -> Completion:
    """A (re)started driver's view of its job folder: the plan stored (put-if-absent) if it was
    made now, and what is done (compacting what a stopped driver left complete)."""
    if not plan.stored:
        save_plan(registry.store, plan.spec.job_dir, plan.units)
    done = Completion.load(registry.store, plan.spec.job_dir, len(plan.units))
    done.compact_complete()
    return done


def _commit(registry: Registry, plan: PatchPlan, spec: UnitSpec, done: Completion, calibration: Calibration | None) -> Manifest:
    for unit in plan.units:
        if done.rows(unit.index) != unit.stop - unit.start:
            raise PatchJobError(f"unit {unit.index} has no valid completion record; rerun the job")
    cfg = plan.config
    params = {
        "input": plan.docs.ref,
        "input_id": plan.docs.id,
        "model": plan.model.model_dump() if plan.model else None,
        "unit_bytes": cfg.unit_bytes,
        "unit_size": plan.unit_size,
        "chunks": cfg.chunks,
        "num_units": len(plan.units),
        "scoring": _scoring(cfg, plan.model),
    }
    parents = [plan.docs.ref] + ([plan.model.ref] if plan.model else [])
    return commit_patches(registry, spec, done, cfg.rule, calibration, parents, params)
