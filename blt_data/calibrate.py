"""Threshold calibration: choose the entropy threshold that gives a target mean patch size.

The BLT paper (§2.3, §4) reports models by their average patch size; its code takes a threshold
in nats and leaves users to tune it by hand. Here a sample of stored entropies fixes it:

    mean patch size(θ) = sample bytes / sample patches(θ)

Invariant: mean patch size is non-decreasing in θ. A higher θ starts a subset of the patches,
and merging patches never adds pieces under ``max_patch_length`` (ceil((a+b)/m) <= ceil(a/m) +
ceil(b/m)). The number of patches is a step function of θ that only changes at the scores (the
values compared with θ, ``patching.start_scores``), so the candidates are one θ per gap between
consecutive distinct scores, plus one below all and one above all. Without ``max_patch_length``
the patch count of every candidate is a cumulative sum over the sorted scores (closed form); with
it, that closed form gives a lower bound on θ and a bisection over the candidates above it
evaluates the real rule (``patch_lengths_batch``) O(log #scores) times.

The result is the candidate closest to the target; it is checked by patching the sample once
more, and it is an error if it misses the target by more than ``tol`` (relative), with the
reachable range in the message. The chosen θ lies midway between two scores, so entropies that
move by float noise on rescoring do not flip many starts. Deterministic: a pure function of the
sample and the arguments.

The sample (``sample_rows``): whole documents, drawn uniformly without replacement over every
document of the job (all units, all parts), seeded. A head-of-part sample is biased wherever the
heads differ from the rest, and cut documents weigh their beginnings (measured: 3% off on the
demo's data). The dataset's mean patch size is a ratio over documents, Σ bytes / Σ patches, so
a uniform document sample estimates it without bias to first order, with a standard error that
the sample itself measures (``Calibration.relative_standard_error``, the ratio estimator's
linearised variance with the finite-population correction); where that error exceeds
``ERROR_BUDGET`` of the tolerance, a larger draw replaces it (``calibrate_drawn``; the draws are nested, so a job scores
only the documents it adds). A dataset of at most
``WHOLE_DATASET_MULTIPLE`` × ``calibration_bytes`` is calibrated on all of its documents: that
costs at most a few samples' scoring, and leaves only the float noise between two scorings.
After the job, the manifest records the whole dataset's mean beside the sample's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from blt_data.patching import PatchRule, patch_lengths_batch, start_scores
from blt_data.storage import Store


# A dataset of at most this many times `calibration_bytes` is calibrated on all of its documents.
WHOLE_DATASET_MULTIPLE = 5
# Fewest documents a drawn sample takes, whatever their size: the standard error falls with the
# number of documents, not of bytes (a handful of long documents is a poor sample).
MIN_SAMPLE_DOCUMENTS = 200
# A draw grows while its standard error exceeds this fraction of the tolerance: a third, as the
# error is itself estimated from the sample and runs low on a heavy-tailed corpus (measured: with
# a half, 1 of 11 draws on bench/calibration.py's 1,000-part corpus missed 2%, at 2.9 errors).
ERROR_BUDGET = 1 / 3
# ... up to this many times its first size.
MAX_SAMPLE_GROWTH = 16


class CalibrationError(ValueError):
    """No threshold gives a mean patch size within tolerance of the target on this sample."""


class Calibration(BaseModel):
    """A calibrated threshold and what it reached on the sample (recorded in the manifest)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(description="nats")
    scheme: Literal["entropy", "monotonic"]
    max_patch_length: int | None
    target: float = Field(description="requested mean patch size, bytes per patch")
    mean_patch_size_reached: float = Field(description="bytes per patch on the sample with `threshold`")
    sample_documents: int
    sample_bytes: int
    sample_patches: int
    tolerance: float = Field(0.02, description="largest accepted relative miss of the target")
    # Absent from records made before whole-document sampling (they sampled part heads).
    seed: int | None = Field(None, description="seed of the sample's draw (rule.calibration_seed)")
    population_documents: int | None = Field(None, description="documents of the dataset the sample was drawn from")
    relative_standard_error: float | None = Field(
        None, description="of the sample's mean patch size as an estimate of the dataset's; 0 when the sample is all of it"
    )
    dataset_mean_patch_size: float | None = Field(None, description="bytes per patch over the whole dataset (set on commit)")

    def patch_rule(self) -> PatchRule:
        return PatchRule(scheme=self.scheme, threshold=self.threshold, max_patch_length=self.max_patch_length)

    @property
    def whole_dataset(self) -> bool:
        return self.population_documents is not None and self.sample_documents >= self.population_documents

    def with_dataset_mean(self, mean_patch_size: float | None) -> "Calibration":
        """The record as a manifest keeps it: with what the threshold gave over the whole dataset."""
        return self.model_copy(update={"dataset_mean_patch_size": mean_patch_size})

    def dataset_miss(self) -> float | None:
        """Relative miss of the target over the whole dataset, (dataset - target) / target."""
        if self.dataset_mean_patch_size is None:
            return None
        return (self.dataset_mean_patch_size - self.target) / self.target

    def warning(self) -> str | None:
        """Why the calibration did not hold over the whole dataset, or None if it did."""
        miss = self.dataset_miss()
        if miss is None or abs(miss) <= self.tolerance:
            return None
        return (
            f"the whole dataset's mean patch size is {self.dataset_mean_patch_size:.4g} bytes, {miss:+.1%} off the "
            f"target {self.target:g} (tolerance {self.tolerance:.0%}); the sample of {self.sample_documents:,} documents "
            f"reached {self.mean_patch_size_reached:.4g}: calibrate on a larger sample (rule.calibration_bytes) "
            "or give the threshold"
        )

    def describe(self) -> str:
        """One line for CLI output and the inspect page."""
        if self.whole_dataset:
            sample = f"all {self.sample_documents:,} documents ({self.sample_bytes:,} bytes)"
        else:
            sample = f"{self.sample_documents:,} documents ({self.sample_bytes:,} bytes"
            sample += f", seed {self.seed})" if self.seed is not None else ", part heads)"
        line = f"calibrated for {self.target:g} bytes on {sample}: sample {self.mean_patch_size_reached:.3f}"
        if self.relative_standard_error and not self.whole_dataset:
            line += f" (±{self.relative_standard_error:.1%})"
        if self.dataset_mean_patch_size is not None:
            line += f", dataset {self.dataset_mean_patch_size:.3f} ({self.dataset_miss():+.2%})"
        return line


@dataclass
class CalibrationSample:
    """Per-document entropies (nats, one array per document) of the documents drawn, and how
    many documents the dataset has (None where unknown)."""

    entropies: Sequence[np.ndarray]
    population_documents: int | None = None


def sample_rows(
    rows: Sequence[int], total_bytes: int, sample_bytes: int, seed: int, num_documents: int | None = None
) -> dict[int, np.ndarray] | None:
    """Which documents form the calibration sample, as ascending row indices per group (a unit,
    a part: ``rows[g]`` documents each), for the groups that hold any; None for all of them.

    All of them when ``total_bytes`` <= WHOLE_DATASET_MULTIPLE × ``sample_bytes``. Otherwise
    ``num_documents`` (default: about ``sample_bytes`` worth at the dataset's mean document size,
    and at least MIN_SAMPLE_DOCUMENTS): the first of ``draw_documents``'s seeded stream, so a
    larger sample holds every document of a smaller one.
    """
    counts = np.asarray(rows, dtype=np.int64)
    total_docs = int(counts.sum())
    if total_bytes <= WHOLE_DATASET_MULTIPLE * sample_bytes or total_docs == 0:
        return None
    if num_documents is None:
        num_documents = max(MIN_SAMPLE_DOCUMENTS, math.ceil(sample_bytes * total_docs / max(1, total_bytes)))
    if num_documents >= total_docs:
        return None
    picks = np.sort(draw_documents(total_docs, num_documents, seed))
    starts = np.concatenate([[0], np.cumsum(counts)])
    groups = np.searchsorted(starts, picks, side="right") - 1
    runs = np.split(np.arange(picks.size), np.flatnonzero(np.diff(groups)) + 1)  # picks of one group each
    return {int(groups[r[0]]): picks[r] - starts[groups[r[0]]] for r in runs}


def draw_documents(total: int, num: int, seed: int) -> np.ndarray:
    """The first ``num`` distinct values of a seeded stream of uniform draws from [0, total): a
    uniform sample without replacement, and a prefix of the sample for any larger ``num``.
    O(num) memory whatever ``total`` (3·10^10 documents of 2 KB in 60 TB)."""
    rng = np.random.default_rng(seed)
    seen: dict[int, None] = {}  # insertion-ordered set
    while len(seen) < num:
        for x in rng.integers(0, total, size=_DRAW_BATCH).tolist():
            seen.setdefault(x, None)
            if len(seen) == num:
                break
    return np.fromiter(seen, dtype=np.int64, count=num)


_DRAW_BATCH = 4096  # fixed: the stream, and so every sample, must not depend on num


def calibrated(
    store: Store, job_dir: str, rule: PatchRule, sample: Callable[[int | None], CalibrationSample]
) -> tuple[PatchRule, Calibration | None]:
    """The rule as a job applies it, and its calibration (None when the rule has a threshold).

    A target patch size becomes a threshold once per job: calibrated on ``sample(num)`` (the
    first ``num`` documents ``sample_rows`` draws with ``rule.calibration_seed``, None for its
    default size: scored by the patch job, read back by repatch), on a larger draw where the
    first one's standard error is too large for the tolerance, and stored in ``<job_dir>/calibration.json`` with put-if-absent; every later
    run of the job reuses it.
    """
    if rule.target_patch_size is None:
        return rule, None
    rel = f"{job_dir}/calibration.json"
    if not store.exists(rel):
        calibration = calibrate_drawn(rule, sample)
        store.put_if_absent(rel, calibration.model_dump_json(indent=2).encode())
    # Whoever stored it first wins: a concurrent run may have scored with other float noise.
    calibration = Calibration.model_validate_json(store.read_bytes(rel))
    return rule.with_threshold(calibration.threshold), calibration


def calibrate_drawn(rule: PatchRule, sample: Callable[[int | None], CalibrationSample]) -> Calibration:
    """Calibrate on the default draw; while its standard error exceeds ERROR_BUDGET × the
    tolerance (so that the whole dataset lands within the tolerance), on a larger draw sized by
    n ∝ 1/error², up to MAX_SAMPLE_GROWTH times the first."""
    num = cap = None
    while True:
        drawn = sample(num)
        calibration = calibrate_threshold(
            drawn.entropies, rule.target_patch_size, scheme=rule.scheme, max_patch_length=rule.max_patch_length,
            population_documents=drawn.population_documents,
        )
        n, error, budget = calibration.sample_documents, calibration.relative_standard_error or 0.0, ERROR_BUDGET * calibration.tolerance
        cap = cap or MAX_SAMPLE_GROWTH * n
        # An unknown population means the caller cannot draw uniformly (a head sample): keep it.
        if error <= budget or calibration.whole_dataset or drawn.population_documents is None or (num or 0) >= cap:
            return calibration.model_copy(update={"seed": rule.calibration_seed})
        num = min(max(math.ceil(1.2 * n * (error / budget) ** 2), 2 * n), cap)


def head_sample(sources: Iterable[Iterable[np.ndarray]], share: int) -> list[np.ndarray]:
    """Up to `share` entropy values from the head of each source (its documents' entropies in
    order, the last one taken cut), for calibrating on stored entropies (repatch, import)."""
    sample: list[np.ndarray] = []
    for documents in sources:
        left = share
        for e in documents:
            if left <= 0:
                break
            if len(e):
                sample.append(np.asarray(e)[:left])
                left -= len(e)
    return sample


def calibrate_threshold(
    entropies: Sequence[np.ndarray] | np.ndarray,
    target_mean_patch_size: float,
    scheme: Literal["entropy", "monotonic"] = "entropy",
    max_patch_length: int | None = None,
    tol: float = 0.02,
    byte_lengths: np.ndarray | Sequence[int] | None = None,
    population_documents: int | None = None,
) -> Calibration:
    """The threshold whose mean patch size on the sample is closest to the target.

    entropies: one array per document (nats, one per UTF-8 byte), or all of them concatenated
        together with ``byte_lengths`` (the layout of an Arrow list column).
    target_mean_patch_size: bytes per patch, counted after the ``max_patch_length`` cut.
    tol: largest accepted relative miss, |reached - target| / target.
    population_documents: documents of the dataset the sample was drawn from (uniformly), for
        the finite-population correction of the standard error; None: a small sample of a large one.

    Raises CalibrationError when no threshold gets within ``tol`` of the target.
    """
    if scheme not in ("entropy", "monotonic"):
        raise ValueError(f"only the entropy schemes have a threshold, not {scheme!r}")
    if not (np.isfinite(target_mean_patch_size) and target_mean_patch_size > 0):
        raise ValueError(f"target_mean_patch_size must be a positive number, got {target_mean_patch_size}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    target = float(target_mean_patch_size)
    e, lengths = _concatenated(entropies, byte_lengths)
    total_bytes = int(lengths.sum())
    if total_bytes == 0:
        raise CalibrationError("the calibration sample has no bytes")
    num_docs = int((lengths > 0).sum())

    # Distinct scores u (ascending) and, per candidate k = 0..U, how many scores lie above its θ:
    # candidate 0 sits below u[0] (every byte starts), candidate k between u[k-1] and u[k],
    # candidate U above u[-1] (only each document's byte 0 starts).
    values, counts = np.unique(start_scores(e, lengths, scheme).astype(np.float64), return_counts=True)
    above = np.concatenate([[counts.sum()], counts.sum() - np.cumsum(counts)])
    mean_no_cut = total_bytes / (num_docs + above)  # non-decreasing in k

    cut_means: dict[int, float] = {}

    def mean_at(k: int) -> float:
        if max_patch_length is None:
            return float(mean_no_cut[k])
        if k not in cut_means:
            cut_means[k] = total_bytes / _count_patches(e, lengths, scheme, _candidate(values, k), max_patch_length)
        return cut_means[k]

    if max_patch_length is None:
        k = int(np.argmin(np.abs(mean_no_cut - target)))
    else:
        # The cut only adds patches, so the first candidate reaching the target without the cut
        # bounds the answer from below; bisect for the first one reaching it with the cut.
        lo, hi = int(np.searchsorted(mean_no_cut, target)), values.size
        lo = min(lo, hi)
        if mean_at(hi) < target:
            k = hi
        else:
            while lo < hi:
                mid = (lo + hi) // 2
                if mean_at(mid) >= target:
                    hi = mid
                else:
                    lo = mid + 1
            k = lo if lo == 0 or abs(mean_at(lo) - target) <= abs(mean_at(lo - 1) - target) else lo - 1

    threshold = _candidate(values, k)
    per_document = _patches_per_document(e, lengths, scheme, threshold, max_patch_length)
    num_patches = int(per_document.sum())
    reached = total_bytes / num_patches
    if abs(reached - mean_at(k)) > 1e-9 * reached:  # the closed form and the rule disagree: a bug
        raise RuntimeError(f"calibration self-check failed: {reached} != {mean_at(k)}")
    if abs(reached - target) > tol * target:
        lowest, highest = mean_at(0), mean_at(values.size)
        if target < lowest or target > highest:
            why = f"this sample reaches mean patch sizes from {lowest:.4g} to {highest:.4g} bytes"
            if target > highest:
                cut = "" if max_patch_length is None else f", cut at max_patch_length={max_patch_length}"
                why += f" (the top: one patch per document{cut})"
        else:
            nearest_below = mean_at(k if reached < target else k - 1)
            nearest_above = mean_at(k if reached > target else k + 1)
            why = (
                f"the patch count moves in steps here: the nearest reachable sizes are {nearest_below:.4g} "
                f"and {nearest_above:.4g}; use a larger sample"
            )
        raise CalibrationError(
            f"no threshold gives a mean patch size within {tol:.1%} of {target:g} bytes "
            f"({scheme}, {total_bytes} sample bytes, closest {reached:.4g}): {why}"
        )
    return Calibration(
        threshold=threshold,
        scheme=scheme,
        max_patch_length=max_patch_length,
        target=target,
        mean_patch_size_reached=reached,
        sample_documents=int(lengths.size),
        sample_bytes=total_bytes,
        sample_patches=num_patches,
        tolerance=tol,
        population_documents=population_documents,
        relative_standard_error=_relative_standard_error(lengths, per_document, population_documents),
    )


def _relative_standard_error(byte_lengths: np.ndarray, num_patches: np.ndarray, population: int | None) -> float:
    """Standard error of the ratio Σ bytes / Σ patches over a uniform sample of n documents, as
    an estimate of the population's, relative to it. Linearised (Cochran, Sampling Techniques,
    §6.3): the residuals z_i = p_i - r b_i with r = Σp / Σb give var(r̂) ≈ (1 - n/N) s_z² / (n b̄²),
    and 1/r̂ has the same relative error to first order."""
    n = byte_lengths.size
    if n < 2 or (population is not None and n >= population):
        return 0.0
    b, p = byte_lengths.astype(np.float64), num_patches.astype(np.float64)
    r = p.sum() / b.sum()
    variance = (1 - n / population if population else 1.0) * np.var(p - r * b, ddof=1) / (n * b.mean() ** 2)
    return float(np.sqrt(variance) / r)


def _concatenated(entropies, byte_lengths) -> tuple[np.ndarray, np.ndarray]:
    if byte_lengths is not None:
        return np.asarray(entropies).reshape(-1), np.asarray(byte_lengths, dtype=np.int64).reshape(-1)
    if isinstance(entropies, np.ndarray):
        raise ValueError("pass one entropy array per document, or the concatenation with byte_lengths")
    arrays = [np.asarray(x).reshape(-1) for x in entropies]
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.float32)), lengths


def _candidate(values: np.ndarray, k: int) -> float:
    """θ of candidate k: below all scores, midway between values[k-1] and values[k], or above all."""
    if values.size == 0:
        return 0.0
    if k == 0:
        return float(values[0]) - 1.0
    if k == values.size:
        return float(values[-1]) + 1.0
    lo, hi = float(values[k - 1]), float(values[k])
    mid = lo + (hi - lo) / 2
    return mid if lo <= mid < hi else lo  # adjacent float64s: lo itself separates them


def _count_patches(e, lengths, scheme, threshold, max_patch_length) -> int:
    return int(_patches_per_document(e, lengths, scheme, threshold, max_patch_length).sum())


def _patches_per_document(e, lengths, scheme, threshold, max_patch_length) -> np.ndarray:
    cfg = PatchRule(scheme=scheme, threshold=threshold, max_patch_length=max_patch_length)
    return patch_lengths_batch(lengths, e, cfg).num_patches
