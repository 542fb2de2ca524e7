"""Threshold calibration: the mean patch size reached is within 2% of the target when patching the
sample again with the returned threshold; unreachable targets fail with the reachable range. The
sample: whole documents drawn uniformly over the job (all of a small dataset), deterministic for
a seed, holding on the whole dataset where a head-of-part sample misses."""

from __future__ import annotations

import sysconfig
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from blt_data.calibrate import (
    ERROR_BUDGET, MIN_SAMPLE_DOCUMENTS, WHOLE_DATASET_MULTIPLE, Calibration, CalibrationError, calibrate_threshold, head_sample,
    sample_rows,
)
from blt_data.documents import DocumentWriter, encode_line, iter_documents
from blt_data.patch_units import Completion, UnitSpec, calibration_sample, commit_patches, patch_unit, plan_units
from blt_data.patches import read_part, read_patches
from blt_data.patching import PatchRule, patch_lengths, patch_lengths_batch
from blt_data.registry import Manifest, Registry
from blt_data.repatch import RepatchConfig, repatch
from blt_data.storage import Store


def synthetic_sample(seed: int = 0, num_docs: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """float16 entropies (nats) with a spread, realistic document lengths (lognormal, mean ~5 KB)."""
    rng = np.random.default_rng(seed)
    byte_lengths = np.maximum(1, rng.lognormal(np.log(5000) - 0.5, 1.0, num_docs)).astype(np.int64)
    e = rng.gamma(2.0, 0.8, int(byte_lengths.sum())).astype(np.float16)
    return e, byte_lengths


def occurrences_before(keys: np.ndarray) -> np.ndarray:
    """For each position, how often its key occurred earlier (vectorised with a stable sort)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    group_start = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    rank = np.arange(keys.size) - np.repeat(group_start, np.diff(np.r_[group_start, keys.size]))
    out = np.empty_like(keys)
    out[order] = rank
    return out


@pytest.fixture(scope="module")
def stdlib_sample() -> tuple[list[str], list[np.ndarray]]:
    """Stdlib sources with a cheap stand-in entropy: each byte's surprisal (nats) under an adaptive
    bigram model, -log((pairs seen + a) / (contexts seen + 256 a)), stored as float16. Unlike a
    unigram surprisal (one value per byte value, so "every space" is one step of ~15% of the
    patches) it takes many values, like a real entropy model's."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]
    texts = [p.read_text(encoding="utf-8", errors="replace")[:20_000] for p in paths]
    data = [t.encode() for t in texts]
    b = np.frombuffer(b"".join(data), np.uint8).astype(np.int64)
    prev = np.r_[0, b[:-1]]
    a = 0.1
    surprisal = -np.log((occurrences_before(prev * 256 + b) + a) / (occurrences_before(prev) + 256 * a))
    entropies = np.split(surprisal.astype(np.float16), np.cumsum([len(d) for d in data])[:-1])
    return texts, entropies


def mean_patch_size(texts_or_lengths, entropies, cal: Calibration) -> float:
    """Re-patch independently (per document) with the calibrated config."""
    cfg = cal.patch_rule()
    patches = sum(patch_lengths(t if isinstance(t, str) else "x" * int(t), e, cfg).size for t, e in zip(texts_or_lengths, entropies))
    total = sum(e.size for e in entropies)
    return total / patches


@pytest.mark.parametrize("scheme", ["entropy", "monotonic"])
@pytest.mark.parametrize("max_patch_length", [None, 12])
def test_synthetic_targets(scheme, max_patch_length):
    e, byte_lengths = synthetic_sample()
    per_doc = np.split(e, np.cumsum(byte_lengths)[:-1])
    for target in (3.0, 4.5, 6.0, 8.0):
        cal = calibrate_threshold(e, target, scheme, max_patch_length, byte_lengths=byte_lengths)
        assert abs(cal.mean_patch_size_reached - target) <= 0.02 * target
        assert (cal.scheme, cal.max_patch_length, cal.target) == (scheme, max_patch_length, target)
        assert (cal.sample_documents, cal.sample_bytes) == (len(byte_lengths), int(byte_lengths.sum()))
        batch = patch_lengths_batch(byte_lengths, e, cal.patch_rule())
        assert batch.patch_lengths.size == cal.sample_patches
        assert cal.sample_bytes / cal.sample_patches == cal.mean_patch_size_reached
        if target == 4.5:  # also the slow per-document path, once per configuration
            assert mean_patch_size(byte_lengths, per_doc, cal) == cal.mean_patch_size_reached
        if max_patch_length:
            assert batch.patch_lengths.max() <= max_patch_length


@pytest.mark.parametrize("scheme", ["entropy", "monotonic"])
def test_stdlib_targets(stdlib_sample, scheme):
    texts, entropies = stdlib_sample
    for target, max_patch_length in ((3.0, None), (4.5, None), (6.0, None), (8.0, None), (4.5, 8), (6.0, 16)):
        cal = calibrate_threshold(entropies, target, scheme, max_patch_length)
        reached = mean_patch_size(texts, entropies, cal)
        assert reached == pytest.approx(cal.mean_patch_size_reached)
        assert abs(reached - target) <= 0.02 * target, (scheme, target, cal)


def test_max_patch_length_near_its_limit():
    e, byte_lengths = synthetic_sample(seed=1)
    # with m = 6 the largest mean is just under 6 (document tails are shorter)
    cal = calibrate_threshold(e, 5.9, "entropy", max_patch_length=6, byte_lengths=byte_lengths)
    assert abs(cal.mean_patch_size_reached - 5.9) <= 0.02 * 5.9
    with pytest.raises(CalibrationError, match=r"reaches mean patch sizes from 1 to 5\.9.*max_patch_length=6"):
        calibrate_threshold(e, 7.0, "entropy", max_patch_length=6, byte_lengths=byte_lengths)


def test_unigram_surprisal_steps_are_reported():
    # one value per byte value: the patch count jumps by every occurrence of a byte value at once
    texts = [p.read_text(encoding="utf-8", errors="replace")[:20_000] for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:20]]
    data = np.frombuffer("".join(texts).encode(), np.uint8)
    counts = np.bincount(data, minlength=256) + 1
    e = (-np.log(counts / counts.sum()))[data].astype(np.float16)
    reached = []
    for target in np.linspace(2.0, 8.0, 13):
        try:
            reached.append(calibrate_threshold([e], target).mean_patch_size_reached)
        except CalibrationError as err:
            assert "the patch count moves in steps here: the nearest reachable sizes are" in str(err)
    assert len(reached) < 13


def test_unreachable_targets_fail_clearly():
    e, byte_lengths = synthetic_sample(num_docs=20)
    with pytest.raises(CalibrationError, match="reaches mean patch sizes from 1 to"):
        calibrate_threshold(e, 0.5, "entropy", byte_lengths=byte_lengths)  # below 1 byte
    with pytest.raises(CalibrationError, match="one patch per document"):
        calibrate_threshold(e, 1e7, "monotonic", byte_lengths=byte_lengths)  # above the mean document
    # ten bytes reach 10, 5, 3.33, 2.5, ...: 3.0 falls between steps
    with pytest.raises(CalibrationError, match="nearest reachable sizes are 2.5 and 3.333"):
        calibrate_threshold([np.arange(10, dtype=np.float16)], 3.0)
    with pytest.raises(CalibrationError, match="no bytes"):
        calibrate_threshold([np.zeros(0, np.float16)], 4.0)
    with pytest.raises(ValueError, match="positive"):
        calibrate_threshold(e, 0.0, byte_lengths=byte_lengths)
    with pytest.raises(ValueError, match="only the entropy schemes"):
        calibrate_threshold(e, 4.0, "space", byte_lengths=byte_lengths)
    with pytest.raises(ValueError, match="with byte_lengths"):
        calibrate_threshold(e, 4.0)


def test_edge_targets_and_tiny_samples():
    # the extremes are reachable: 1 byte per patch and one patch per document
    e = np.array([0.5, 1.0, 1.0, 2.0], np.float16)
    assert calibrate_threshold([e], 1.0).mean_patch_size_reached == 1.0
    assert calibrate_threshold([e], 4.0).mean_patch_size_reached == 4.0
    # starts where e > θ: θ between 1.0 and 2.0 gives patches [3, 1]
    cal = calibrate_threshold([e], 2.0)
    assert cal.threshold == 1.5 and cal.sample_patches == 2
    # single-byte and empty documents have nothing to calibrate but still count
    cal = calibrate_threshold([np.zeros(1, np.float16), np.zeros(0, np.float16)], 1.0)
    assert (cal.sample_documents, cal.sample_bytes, cal.sample_patches) == (2, 1, 1)


def test_deterministic_and_layout_independent():
    e, byte_lengths = synthetic_sample(seed=2, num_docs=40)
    per_doc = np.split(e, np.cumsum(byte_lengths)[:-1])
    a = calibrate_threshold(e, 5.0, "monotonic", 10, byte_lengths=byte_lengths)
    b = calibrate_threshold(per_doc, 5.0, "monotonic", 10)
    c = calibrate_threshold([x.astype(np.float32) for x in per_doc], 5.0, "monotonic", 10)
    assert a == b == c
    assert Calibration.model_validate_json(a.model_dump_json()) == a
    assert a.patch_rule() == PatchRule(scheme="monotonic", threshold=a.threshold, max_patch_length=10)


# --- The sample: whole documents drawn uniformly over the job, or all of them -------------------


def test_sample_rows_uniform_deterministic_and_all_when_small():
    rows = [50] * 400  # 20,000 documents in 400 groups (units, parts)
    total = 20_000 * 1000  # 1 KB each
    assert sample_rows(rows, total, total // WHOLE_DATASET_MULTIPLE, seed=0) is None  # small: everything
    picks = sample_rows(rows, total, 10**6, seed=0)
    again = sample_rows(rows, total, 10**6, seed=0)
    assert picks.keys() == again.keys() and all(np.array_equal(picks[g], again[g]) for g in picks)
    other = sample_rows(rows, total, 10**6, seed=1)
    flat = np.concatenate([g * 50 + picks[g] for g in sorted(picks)])
    assert flat.size == 1000 and np.unique(flat).size == 1000  # about 1 MB at 1 KB each, distinct
    assert not np.array_equal(flat, np.concatenate([g * 50 + other[g] for g in sorted(other)]))
    assert all(np.all(np.diff(p) > 0) and p.min() >= 0 and p.max() < 50 for p in picks.values())
    # spread: most groups hold some, and positions inside a group are not just its head
    assert len(picks) > 300 and np.mean(np.concatenate(list(picks.values()))) == pytest.approx(24.5, abs=2)
    # long documents: never fewer than MIN_SAMPLE_DOCUMENTS, and all of them if that is everything
    assert sum(p.size for p in sample_rows([10] * 100, 10**9, 10**6, seed=0).values()) == MIN_SAMPLE_DOCUMENTS
    assert sample_rows([10] * 10, 10**9, 10**6, seed=0) is None


def test_standard_error_is_zero_on_everything_and_matches_the_spread_of_draws():
    rng = np.random.default_rng(3)
    byte_lengths = np.maximum(1, rng.lognormal(np.log(800), 1.0, 2000)).astype(np.int64)
    # documents differ in how predictable they are, as real ones do
    docs = [rng.gamma(2.0, rng.uniform(0.6, 1.0), n).astype(np.float16) for n in byte_lengths]
    whole = calibrate_threshold(docs, 4.0, population_documents=len(docs))
    assert whole.whole_dataset and whole.relative_standard_error == 0.0
    rule = whole.patch_rule()
    # Draws of 200 documents, patched with the whole's threshold: their spread around the whole's
    # mean is what the standard error of one draw predicts.
    means, errors = [], []
    for seed in range(25):
        pick = sample_rows([len(docs)], int(byte_lengths.sum()), 10**5, seed)[0]
        sample = [docs[i] for i in pick]
        lengths = np.array([d.size for d in sample])
        means.append(lengths.sum() / patch_lengths_batch(lengths, np.concatenate(sample), rule).patch_lengths.size)
        errors.append(calibrate_threshold(sample, 4.0, population_documents=len(docs)).relative_standard_error)
    spread = np.std(np.array(means) / whole.mean_patch_size_reached - 1)
    assert 0.5 < np.mean(errors) / spread < 2.0


def test_calibration_record_says_how_the_dataset_came_out():
    e, byte_lengths = synthetic_sample(seed=4, num_docs=60)
    cal = calibrate_threshold(e, 4.0, byte_lengths=byte_lengths, population_documents=600)
    assert not cal.whole_dataset and cal.warning() is None and "dataset" not in cal.describe()
    held = cal.with_dataset_mean(4.06)
    assert held.warning() is None and "dataset 4.060 (+1.50%)" in held.describe()
    missed = cal.with_dataset_mean(4.12)
    assert "+3.0% off the target 4" in missed.warning() and "dataset 4.120 (+3.00%)" in missed.describe()
    # records made before whole-document sampling still read, and say they sampled part heads
    old = {k: v for k, v in cal.model_dump().items() if k in ("threshold", "scheme", "max_patch_length", "target",
           "mean_patch_size_reached", "sample_documents", "sample_bytes", "sample_patches")}
    assert "part heads" in Calibration.model_validate(old).describe()


def heads_differ_dataset(reg: Registry, num_parts: int = 30, per_part: int = 20, body_bytes=(500, 1500)) -> Manifest:
    """Parts whose first document is long boilerplate (low entropy, long patches) and whose
    other documents are ordinary, committed as a documents dataset of one part each."""
    folder = reg.job_dir("docs", "j")
    rng = np.random.default_rng(0)
    text_bytes, n = 0, 0
    parts = []
    for p in range(num_parts):
        with DocumentWriter(reg.store, folder, "_jobs/j", target_part_bytes=10**9, first_index=p) as w:
            for i in range(per_part + 1):
                size = 1500 if i == 0 else int(rng.integers(*body_bytes))
                text = ("HEAD " if i == 0 else "BODY ") + "".join(rng.choice(list("abcdefgh "), size - 5))
                w.write_line(encode_line({"id": f"p{p}-{i}", "text": text}))
                text_bytes, n = text_bytes + size, n + 1
        parts += w.parts
    return reg.commit(Manifest(name="docs", kind="documents", job_id="j", parts=parts,
                               stats={"documents": n, "bytes": text_bytes, "splits": {"train": n}}))


def synthetic_score(texts):
    """A stand-in entropy model with a spread of values: per-byte gamma noise seeded by the text;
    boilerplate ("HEAD ...") at four fifths of the scale, so its patches are much longer."""
    for t in texts:
        rng = np.random.default_rng(zlib.crc32(t.encode()))
        yield rng.gamma(2.0, 0.8 / (1.25 if t.startswith("HEAD") else 1), len(t.encode())).astype(np.float32)


def test_calibration_sample_is_whole_documents_spread_over_units(local_store_url):
    reg = Registry(Store.open(local_store_url))
    docs = heads_differ_dataset(reg)
    units = plan_units(reg, docs, unit_bytes=8000)
    every = {d["text"]: d["id"] for d in iter_documents(reg, docs)}
    total = sum(u.bytes for u in units)
    sample = partial(calibration_sample, reg.store, reg.dataset_dir("docs"), units)
    texts, population = sample(1024, seed=0)
    assert population == len(every) == 630 and len(texts) == MIN_SAMPLE_DOCUMENTS
    for (part, line), text in texts.items():  # whole documents, at their place
        assert every[text] == f"p{[p.path for p in docs.parts].index(part)}-{line}"
    assert texts == sample(1024, seed=0)[0]
    assert texts.keys() != sample(1024, seed=1)[0].keys()
    assert len({p for p, _ in texts}) > 25 and sum(line == 0 for _, line in texts) < 30  # not the heads
    assert len({u.index for u in units for p, line in texts if u.part == p and u.start <= line < u.stop}) > 40
    larger = sample(1024, seed=0, num_documents=400)[0]  # a larger draw holds the smaller one
    assert len(larger) == 400 and texts.items() <= larger.items()
    # a dataset within WHOLE_DATASET_MULTIPLE samples: all of it
    texts, population = sample(-(-total // WHOLE_DATASET_MULTIPLE), 0)
    assert sorted(texts.values()) == sorted(every) and population == len(every)
    # only the parts that hold a drawn document are read: the others may as well be gone
    few = sample(1024, seed=0, num_documents=5)[0]
    for part in {p.path for p in docs.parts} - {p for p, _ in few}:
        reg.store.delete(f"{reg.dataset_dir('docs')}/{part}")
    assert sample(1024, seed=0, num_documents=5)[0] == few


def test_uniform_sample_holds_on_the_dataset_where_part_heads_miss(local_store_url):
    """Through repatch (stored entropies, no model): the old head-of-part sample calibrates on
    the boilerplate heads and misses the target on the whole dataset by far more than 2%; the
    uniform whole-document sample holds, and the manifest records both means."""
    reg = Registry(Store.open(local_store_url))
    docs = heads_differ_dataset(reg, num_parts=50, per_part=50, body_bytes=(200, 600))  # 2,550 documents, 1.1 MB
    spec = UnitSpec(input_dir=reg.dataset_dir("docs"), output_dir=reg.dataset_dir("scored"), name="scored", job_id="s",
                    patch=PatchRule(threshold=1.0), keep_entropies=True)
    units = plan_units(reg, docs, unit_bytes=8000)
    done = Completion(reg.store, spec.job_dir, len(units))
    for u in units:
        done.add(patch_unit(reg.store, u, spec, synthetic_score))
    scored = commit_patches(reg, spec, done, spec.patch, None, ["docs@v1"], {"input": "docs@v1"})
    table = read_patches(reg, scored)
    lengths = np.array([len(t.encode()) for t in table.column("text").to_pylist()])
    entropies = np.concatenate(table.column("entropies").to_numpy(zero_copy_only=False))

    def dataset_mean(threshold: float) -> float:
        return lengths.sum() / patch_lengths_batch(lengths, entropies, PatchRule(threshold=threshold)).patch_lengths.size

    rule = PatchRule(target_patch_size=4.0, calibration_bytes=30_000)  # a draw, not everything
    old = calibrate_threshold(head_sample((reg_part_entropies(reg, scored, p) for p in scored.parts),
                                          rule.calibration_bytes // len(scored.parts)), 4.0)
    assert abs(dataset_mean(old.threshold) / 4.0 - 1) > 0.02

    m = repatch(reg, RepatchConfig(patches="scored", name="cal", rule=rule))
    c = Calibration.model_validate(m.params["calibration"])
    # 200 documents left a standard error of 1.7% (heads are 2% of the documents, 7% of the
    # bytes): the draw grew until it fell under a third of the tolerance
    assert not c.whole_dataset and c.sample_documents > MIN_SAMPLE_DOCUMENTS and c.seed == 0
    assert c.relative_standard_error <= ERROR_BUDGET * 0.02
    assert c.dataset_mean_patch_size == m.stats.mean_patch_length == pytest.approx(dataset_mean(c.threshold))
    assert abs(c.dataset_mean_patch_size / 4.0 - 1) <= 0.02 and c.warning() is None
    assert abs(c.mean_patch_size_reached / 4.0 - 1) <= 0.02
    # the seed is part of the job: another seed is another job, drawing other documents; a rule
    # with a threshold has no use for it, and its job ids stay what they were
    assert "calibration_seed" not in PatchRule(threshold=1.0).model_dump() and "calibration_seed" in rule.model_dump()
    other = repatch(reg, RepatchConfig(patches="scored", name="cal", rule=rule.model_copy(update={"calibration_seed": 1})))
    assert other.job_id != m.job_id and other.params["calibration"]["threshold"] != c.threshold


def reg_part_entropies(reg: Registry, manifest: Manifest, part):
    return read_part(reg.store, reg.part_path(manifest, part), ["entropies"]).column(0).to_numpy(zero_copy_only=False)
