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
sample and the arguments. Which documents form the sample is the caller's choice.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from blt_data.patching import PatchRule, patch_lengths_batch, start_scores
from blt_data.storage import Store


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

    def patch_rule(self) -> PatchRule:
        return PatchRule(scheme=self.scheme, threshold=self.threshold, max_patch_length=self.max_patch_length)


def calibrated(
    store: Store, job_dir: str, rule: PatchRule, sample: Callable[[], Sequence[np.ndarray]]
) -> tuple[PatchRule, Calibration | None]:
    """The rule as a job applies it, and its calibration (None when the rule has a threshold).

    A target patch size becomes a threshold once per job: calibrated on ``sample()`` (per-document
    entropies the caller provides: scored by the patch job, read back by repatch) and stored in
    ``<job_dir>/calibration.json`` with put-if-absent; every later run of the job reuses it.
    """
    if rule.target_patch_size is None:
        return rule, None
    rel = f"{job_dir}/calibration.json"
    if not store.exists(rel):
        calibration = calibrate_threshold(
            sample(), rule.target_patch_size, scheme=rule.scheme, max_patch_length=rule.max_patch_length
        )
        store.put_if_absent(rel, calibration.model_dump_json(indent=2).encode())
    # Whoever stored it first wins: a concurrent run may have scored with other float noise.
    calibration = Calibration.model_validate_json(store.read_bytes(rel))
    return rule.with_threshold(calibration.threshold), calibration


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
) -> Calibration:
    """The threshold whose mean patch size on the sample is closest to the target.

    entropies: one array per document (nats, one per UTF-8 byte), or all of them concatenated
        together with ``byte_lengths`` (the layout of an Arrow list column).
    target_mean_patch_size: bytes per patch, counted after the ``max_patch_length`` cut.
    tol: largest accepted relative miss, |reached - target| / target.

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
    num_patches = _count_patches(e, lengths, scheme, threshold, max_patch_length)
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
    )


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
    cfg = PatchRule(scheme=scheme, threshold=threshold, max_patch_length=max_patch_length)
    return int(patch_lengths_batch(lengths, e, cfg).patch_lengths.size)
