"""Dataset statistics: one model for a unit, a part, a dataset, or several datasets.

Statistics of disjoint pieces add (``a + b``) into the statistics of their union, field by
field, without losing any: counts and lists add, per-split counts add key by key, histograms add
bin by bin, and the summaries (mean patch length, entropy quantiles) are derived again from the
sums. ``DatasetStats()`` is the neutral start (``sum(pieces, DatasetStats())``).

Optional fields are ``None`` where they do not apply (no patches in a documents dataset, no
entropies without a model). A piece with documents but without a field (a documents dataset
added to a patches dataset) makes that field ``None`` in the sum: a partial count would lie.

Invariant: every field except ``entropy_sum`` is an integer count or derived from counts, so
sums do not depend on the order of addition; ``entropy_sum`` (float) does, so callers add units
in unit order and resumed and uninterrupted jobs agree bit for bit.

NOTE: manifests written before the entropy histogram was stored carry only their quantiles;
they still read (the stored quantiles are kept), but a sum with them has no quantiles.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Histogram bins of patch lengths: bin i (0..63) counts patches of length i + 1 bytes, bin 64
# counts patches longer than 64 bytes. Fixed bins so that per-unit histograms add up.
HISTOGRAM_MAX_LENGTH = 64
HISTOGRAM_BINS = HISTOGRAM_MAX_LENGTH + 1
# Entropy histogram (for quantiles that add over units): bins of 1/256 nat over [0, 6) nats,
# plus one overflow bin. ln(260) = 5.56 nats is the largest possible entropy over 260 ids.
ENTROPY_BINS_PER_NAT = 256
ENTROPY_MAX_NATS = 6
ENTROPY_BINS = ENTROPY_BINS_PER_NAT * ENTROPY_MAX_NATS + 1
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)

_COUNTS = ("documents", "bytes", "quarantined", "blank_lines", "duplicate_ids")
_LISTS = ("duplicate_id_examples", "damaged_files", "skipped_files")


class DatasetStats(BaseModel):
    """Statistics of a dataset or of a disjoint piece of one; pieces add (``a + b``)."""

    model_config = ConfigDict(extra="forbid")

    documents: int = 0
    bytes: int = Field(0, description="UTF-8 bytes of document text (= sum of patch lengths)")
    quarantined: int = 0
    blank_lines: int = 0
    duplicate_ids: int = 0
    duplicate_id_examples: list[str] = Field(default_factory=list)
    damaged_files: list[dict[str, Any]] = Field(default_factory=list)
    skipped_files: list[str] = Field(default_factory=list)
    splits: dict[str, int] = Field(default_factory=dict, description="documents per split")
    # Patches datasets.
    patches: int | None = None
    patch_length_histogram: list[int] | None = Field(
        None, description="bin i < 64: patches of i + 1 bytes; bin 64: patches longer than 64 bytes"
    )
    entropy_histogram: list[int] | None = Field(None, description="ENTROPY_BINS counts of per-byte entropies")
    entropy_sum: float | None = Field(None, description="nats, sum over bytes (for the mean)")
    # Derived from the fields above (stored so that a manifest reads on its own).
    mean_patch_length: float | None = None
    entropy_quantiles: dict[str, float] | None = Field(None, description="nats, bin midpoints (±1/512 nat), and the mean")

    @model_validator(mode="after")
    def _derive(self) -> "DatasetStats":
        if not self.entropy_histogram:  # unit records before this model stored [] and 0.0
            self.entropy_histogram = None
            if self.entropy_sum == 0.0:
                self.entropy_sum = None
        if self.patches is not None:
            self.mean_patch_length = self.bytes / self.patches if self.patches else None
        if self.entropy_histogram is not None:
            self.entropy_quantiles = _quantiles(self.entropy_histogram, self.entropy_sum or 0.0, self.bytes)
        return self

    @classmethod
    def of(cls, patch_lengths: pa.ListArray, entropies: np.ndarray | None) -> "DatasetStats":
        """Stats of a ``patch_lengths`` column and its flat float16 entropies (or None)."""
        stats = patch_stats(
            patch_lengths.values.to_numpy(zero_copy_only=False), patch_lengths.value_lengths().to_numpy(zero_copy_only=False)
        )
        if entropies is None:
            return stats
        histogram, total = entropy_summary(entropies)
        return DatasetStats(**(stats.model_dump() | {"entropy_histogram": histogram.tolist(), "entropy_sum": total}))

    def __add__(self, other: "DatasetStats") -> "DatasetStats":
        merged: dict[str, Any] = {k: getattr(self, k) + getattr(other, k) for k in _COUNTS + _LISTS}
        merged["splits"] = {k: self.splits.get(k, 0) + other.splits.get(k, 0) for k in {**self.splits, **other.splits}}
        merged["patches"] = _add(self, other, "patches", int.__add__)
        merged["patch_length_histogram"] = _add(self, other, "patch_length_histogram", _add_bins)
        merged["entropy_histogram"] = _add(self, other, "entropy_histogram", _add_bins)
        merged["entropy_sum"] = _add(self, other, "entropy_sum", float.__add__) if merged["entropy_histogram"] else None
        if merged["entropy_histogram"] is None:  # quantiles of one side alone would misstate the sum
            merged["entropy_quantiles"] = _add(self, other, "entropy_quantiles", lambda a, b: None)
        return DatasetStats(**merged)


def _add(a: DatasetStats, b: DatasetStats, field: str, add):
    """Sum of an optional field: a piece without documents adds nothing; a piece with documents
    but without the field makes the sum unknown (None)."""
    x, y = getattr(a, field), getattr(b, field)
    if x is None or y is None:
        if x is None and a.documents:
            return None
        if y is None and b.documents:
            return None
        return x if y is None else y
    return add(x, y)


def _add_bins(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b, strict=True)]


def _quantiles(histogram: list[int], entropy_sum: float, num_bytes: int) -> dict[str, float] | None:
    """Quantiles (nats) at the midpoint of their histogram bin (±1/512 nat), plus the mean."""
    if not num_bytes:
        return None
    cumulative = np.cumsum(histogram)
    out = {}
    for q in QUANTILES:
        b = int(np.searchsorted(cumulative, q * cumulative[-1]))
        out[f"q{round(q * 100):02d}"] = round(min((b + 0.5) / ENTROPY_BINS_PER_NAT, ENTROPY_MAX_NATS), 6)
    out["mean"] = round(entropy_sum / num_bytes, 6)
    return out


def _entropy_bins(e: np.ndarray) -> np.ndarray:
    return np.clip(e.astype(np.float32) * ENTROPY_BINS_PER_NAT, 0, ENTROPY_BINS - 1).astype(np.int64)


# The bin of every float16 value, by its bit pattern (NaN gets no valid bin: never looked up).
with np.errstate(invalid="ignore"):
    _FLOAT16_BINS = _entropy_bins(np.arange(1 << 16, dtype=np.uint16).view(np.float16))


def entropy_summary(entropies: np.ndarray) -> tuple[np.ndarray, float]:
    """(ENTROPY_BINS counts, float sum) of per-byte entropies.

    float16 (as stored) goes through a count of each of its 65536 bit patterns: one pass over the
    bytes instead of conversions, and the sum is exact (integers in units of 2**-24, the float16
    grid) and then rounded once; a float64 sum of the values in any order equals it whenever that
    sum made no rounding error (below 2**29 nats). Non-finite values take the direct path.
    """
    e = np.asarray(entropies)
    if e.dtype == np.float16:
        counts = np.zeros(1 << 16, dtype=np.int64)
        for chunk in _chunks(e.reshape(-1).view(np.uint16)):  # bincount converts to int64: small pieces stay in cache
            counts += np.bincount(chunk, minlength=1 << 16)
        codes = np.flatnonzero(counts)
        values = codes.astype(np.uint16).view(np.float16)
        if np.isfinite(values).all():
            histogram = np.bincount(_FLOAT16_BINS[codes], weights=counts[codes], minlength=ENTROPY_BINS).astype(np.int64)
            units = (values.astype(np.float64) * 2.0**24).astype(np.int64)  # exact: float16 is on that grid
            return histogram, float(sum(map(int.__mul__, counts[codes].tolist(), units.tolist()))) / 2.0**24
    return np.bincount(_entropy_bins(e), minlength=ENTROPY_BINS), float(e.astype(np.float64).sum())


def patch_stats(
    patch_lengths: np.ndarray | Sequence[np.ndarray], num_patches: np.ndarray | None = None
) -> DatasetStats:
    """Stats of per-document arrays of patch lengths, or of the concatenation plus the patches per
    document (``patch_stats(*patch_lengths_batch(...))``)."""
    if num_patches is None:
        if isinstance(patch_lengths, np.ndarray):
            raise ValueError("a concatenated patch_lengths array needs num_patches (patches per document)")
        documents = len(patch_lengths)
        lengths = np.concatenate([np.zeros(0, np.int64), *(np.asarray(p, dtype=np.int64) for p in patch_lengths)])
    else:
        documents = len(num_patches)
        lengths = np.asarray(patch_lengths)
        if not np.issubdtype(lengths.dtype, np.integer):
            lengths = lengths.astype(np.int64)
        if int(np.sum(num_patches)) != lengths.size:
            raise ValueError(f"num_patches sums to {int(np.sum(num_patches))}, but there are {lengths.size} patch lengths")
    if lengths.size and lengths.min() < 1:
        raise ValueError("patch lengths must be >= 1")
    histogram = np.zeros(HISTOGRAM_BINS + 1, dtype=np.int64)
    for chunk in _chunks(lengths):  # bincount converts to int64: small pieces stay in cache
        histogram += np.bincount(np.minimum(chunk, HISTOGRAM_BINS), minlength=HISTOGRAM_BINS + 1)
    return DatasetStats(
        documents=documents, bytes=int(lengths.sum(dtype=np.int64)), patches=int(lengths.size),
        patch_length_histogram=histogram[1:].tolist(),
    )


def _chunks(a: np.ndarray, size: int = 1 << 20):
    return (a[i : i + size] for i in range(0, a.size, size))
