import numpy as np
import pyarrow as pa
import pytest

from blt_data.stats import ENTROPY_BINS, ENTROPY_BINS_PER_NAT, DatasetStats, entropy_summary, patch_stats


def patches_stats(lengths: list[list[int]], seed: int) -> DatasetStats:
    column = pa.array(lengths, pa.list_(pa.int32()))
    entropies = np.random.default_rng(seed).uniform(0, 4, sum(map(sum, lengths))).astype(np.float16)
    return DatasetStats.of(column, entropies).model_copy(update={"splits": {"train": len(lengths)}})


def test_two_datasets_add_without_losing_patch_fields():
    a, b = patches_stats([[1, 2], [70]], 0), patches_stats([[3, 3, 3]], 1)
    total = a + b
    assert (total.documents, total.bytes, total.patches) == (3, 82, 6)
    assert total.splits == {"train": 3}
    assert total.patch_length_histogram == [x + y for x, y in zip(a.patch_length_histogram, b.patch_length_histogram)]
    assert total.mean_patch_length == pytest.approx(82 / 6)
    assert sum(total.entropy_histogram) == 82 and len(total.entropy_histogram) == ENTROPY_BINS
    assert total.entropy_sum == pytest.approx(a.entropy_sum + b.entropy_sum)
    assert total.entropy_quantiles["mean"] == pytest.approx(total.entropy_sum / 82, abs=1e-6)
    assert DatasetStats.model_validate_json(total.model_dump_json()) == total


def test_documents_stats_add_like_before():
    a = DatasetStats(documents=2, bytes=10, quarantined=1, duplicate_id_examples=["x"], splits={"train": 2})
    b = DatasetStats(documents=1, bytes=5, skipped_files=["f.png"], splits={"val": 1})
    total = a + b
    assert (total.documents, total.bytes, total.quarantined) == (3, 15, 1)
    assert total.splits == {"train": 2, "val": 1} and total.skipped_files == ["f.png"]
    assert total.patches is None and total.mean_patch_length is None and total.entropy_quantiles is None


def test_a_piece_without_a_field_makes_the_sum_unknown_not_partial():
    docs = DatasetStats(documents=4, bytes=40)
    total = docs + patches_stats([[1, 2]], 0)
    assert total.documents == 5 and total.patches is None and total.patch_length_histogram is None
    assert total.entropy_histogram is None and total.entropy_quantiles is None
    assert (DatasetStats() + patch_stats([np.array([2, 2])])).patches == 2  # the empty start is neutral


def test_manifest_stats_and_unit_records_written_before_still_read():
    old_manifest = {
        "documents": 2, "bytes": 9, "quarantined": 0, "blank_lines": 0, "duplicate_ids": 0,
        "duplicate_id_examples": [], "damaged_files": [], "skipped_files": [], "splits": {"train": 2},
        "patches": 3, "mean_patch_length": 3.0, "patch_length_histogram": [0, 0, 3] + [0] * 62,
        "entropy_quantiles": {"q50": 1.5, "mean": 1.4},
    }
    s = DatasetStats.model_validate(old_manifest)
    assert s.entropy_quantiles == {"q50": 1.5, "mean": 1.4} and s.mean_patch_length == 3.0
    old_record = {"documents": 1, "bytes": 4, "patches": 2, "patch_length_histogram": [0, 2] + [0] * 63,
                  "entropy_histogram": [], "entropy_sum": 0.0}
    r = DatasetStats.model_validate(old_record)
    assert r.entropy_histogram is None and r.entropy_sum is None and r.mean_patch_length == 2.0


def _entropy_summary_direct(e: np.ndarray) -> tuple[np.ndarray, float]:
    """The histogram and sum as first written: float32 bins, float64 sum of the values."""
    e32 = e.astype(np.float32)
    bins = np.clip(e32 * ENTROPY_BINS_PER_NAT, 0, ENTROPY_BINS - 1).astype(np.int64)
    return np.bincount(bins, minlength=ENTROPY_BINS), float(e32.astype(np.float64).sum())


@pytest.mark.parametrize("seed", range(6))
def test_entropy_summary_by_bit_pattern_equals_the_direct_one(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 20000))
    every = rng.integers(0, 1 << 16, n).astype(np.uint16).view(np.float16)
    for e in (
        rng.gamma(2.0, 0.8, n), rng.uniform(-8, 8, n), rng.uniform(0, 1e-6, n),  # negatives, subnormals
        every[np.isfinite(every)], np.zeros(0),
    ):
        e = e.astype(np.float16)
        histogram, total = entropy_summary(e)
        direct = _entropy_summary_direct(e)
        assert histogram.tolist() == direct[0].tolist() and total == direct[1]
    with_inf = np.array([1.0, np.inf], np.float16)  # not finite: the direct path, as before
    assert entropy_summary(with_inf)[1] == np.inf and entropy_summary(with_inf)[0].tolist() == _entropy_summary_direct(with_inf)[0].tolist()
