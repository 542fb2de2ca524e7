"""The inspect page of a patches dataset: built from a real lineage (download → shuffle → patch →
repatch, plus an entropy model), checked as HTML and in a real headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from blt_data.download import DownloadConfig, download
from blt_data.inspection import InspectError, cut_at_character, write_inspect_page
from blt_data.patch_units import UnitSpec, patch_unit, plan_units
from blt_data.patches import arrow_schema_summary
from blt_data.patching import PatchRule
from blt_data.registry import Manifest, Registry, RegistryError
from blt_data.repatch import RepatchConfig, repatch
from blt_data.shuffle import shuffle_documents
from blt_data.stats import DatasetStats
from blt_data.storage import Store
from tests.blt_data.test_patches import fake_score

CHROMIUM = "/usr/bin/chromium"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DOCS = {
    "html<&>\"'": 'Entropy <b>patches</b> & "quotes" — café 😀 naïve </pre></span>',
    "code": "def f(x):\n\treturn x + 1  # tab, newline\n\nprint(f(41))\n",
    "ctrl": "bell\x07 NUL\x00 CR\r\n end",
    "empty": "",
    "long": "The quick brown fox jumps over the lazy dog. " * 60,  # 2,700 bytes: cut at max_bytes
    "tail": "last document",
}


def build_lineage(reg: Registry, tmp_path: Path) -> dict[str, Manifest]:
    """docs@v1 (download) → shuf@v1 (seed 7) → pat@v1 (entropy, θ=1, model ent@v1) → rep@v1
    (repatch: monotonic, max patch length 3), and nent@v1 (space scheme, no entropies)."""
    from blt_model.entropy_registry import register_entropy_model
    from tests.blt_data.test_entropy import tiny_model

    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in DOCS.items()))
    docs = download(reg, DownloadConfig(source=str(source), name="docs"))
    shuf = shuffle_documents(reg, "docs", "shuf", num_chunks=1, seed=7, memory_bytes=1 << 20, val_docs=0)
    ent = register_entropy_model(reg, tiny_model(n_layers=1), "ent", "entjob", [shuf.ref], {"val_bpb": 7.5})
    model = {"ref": ent.ref, "sha256": ent.params["sha256"]}
    pat = patch_dataset(reg, shuf, "pat", PatchRule(scheme="entropy", threshold=1.0), fake_score, [shuf.ref, ent.ref], model)
    rep = repatch(reg, RepatchConfig(patches="pat", name="rep", rule=PatchRule(scheme="monotonic", threshold=0.5, max_patch_length=3)))
    nent = patch_dataset(reg, shuf, "nent", PatchRule(scheme="space"), None, [shuf.ref], None)
    return {"docs": docs, "shuf": shuf, "ent": ent, "pat": pat, "rep": rep, "nent": nent}


def patch_dataset(reg, docs, name, patch, score, parents, model) -> Manifest:
    """What the patch job does, without Ray: every unit through ``patch_unit``, then the commit."""
    spec = UnitSpec(input_dir=reg.dataset_dir(docs.name), output_dir=reg.dataset_dir(name), name=name,
                    job_id=f"{name}-job", patch=patch, keep_entropies=score is not None)
    records = [patch_unit(reg.store, u, spec, score) for u in plan_units(reg, docs, unit_bytes=1 << 20)]
    stats = sum((r.stats for r in records), DatasetStats())
    params = {"input": docs.ref, "model": model, **patch.model_dump(), "entropies": score is not None}
    return reg.commit(Manifest(
        name=name, kind="patches", job_id=spec.job_id, parents=parents, params=params,
        arrow_schema=arrow_schema_summary(score is not None), parts=[r.part for r in records],
        stats=stats.model_copy(update={"splits": {"train": stats.documents}}),
    ))


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    reg = Registry(Store.open(str(root / "store")))
    return reg, build_lineage(reg, root)


def rows_of(reg: Registry, m: Manifest) -> dict[str, dict]:
    from blt_data.patches import read_patches

    return {r["id"]: r for r in read_patches(reg, m).to_pylist()}


def markers(page: str) -> Counter:
    """Patch boxes per document section (keyed by the escaped id attribute)."""
    counts = Counter()
    for section in re.findall(r'<section class="doc" data-doc-id="([^"]*)"(.*?)</section>', page, re.S):
        counts[html.unescape(section[0])] = len(re.findall(r'<span class="patch[^"]*" data-patch="\d+"', section[1]))
    return counts


def check_png(path: Path, min_bytes: int = 3000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes, (path, len(data))


def test_page_with_entropies(lineage, tmp_path):
    reg, made = lineage
    ids = list(DOCS)
    index = write_inspect_page(reg, "pat", tmp_path / "page", doc_ids=ids, max_bytes=2000)
    assert index == tmp_path / "page" / "index.html"
    page = index.read_bytes().decode()
    rows = rows_of(reg, made["pat"])
    shown = markers(page)
    for doc_id, text in DOCS.items():
        utf8 = text.encode()
        cut = cut_at_character(utf8, 2000)
        starts = np.concatenate([[0], np.cumsum(rows[doc_id]["patch_lengths"])[:-1]]) if utf8 else np.zeros(0)
        assert shown[doc_id] == int((starts < cut).sum()), doc_id  # one box per patch shown
        assert html.escape(utf8[:cut].decode()) in page  # the plain text, escaped
    assert 'Entropy &lt;b&gt;patches&lt;/b&gt; &amp; &quot;quotes&quot;' in page and "<b>patches</b>" not in page
    assert "</pre></span>" not in page  # text never closes the page's own tags
    assert '<span class="c" style="background:#' in page and "H = " in page
    assert "first UTF-8 byte" in page and "showing the first 2,000 of 2,700 bytes" in page
    # A multi-byte character is one span: 😀 (4 bytes) is titled with its byte range.
    assert re.search(r'title="bytes (\d+)–(\d+) · H = [\d.]+ nats \(first byte\)">😀</span>', page)
    for code in ("07", "00", "0d"):  # control characters drawn as escapes
        assert f'<span class="ctl">\\x{code}</span>' in page
    for k in range(len(DOCS)):
        if DOCS[ids[k]]:
            check_png(tmp_path / "page" / f"trace-{k}.png")
    assert not (tmp_path / "page" / f"trace-{ids.index('empty')}.png").exists()
    check_png(tmp_path / "page" / "patch-lengths.png")
    # Lineage: every ancestor with its kind and key parameters.
    for expected in ("pat@v1", "shuf@v1", "docs@v1", "ent@v1", "entropy-model", "seed 7", "threshold 1",
                     f"entropy model ent@v1 (sha256 {made['ent'].params['sha256'][:12]}…)", "shown above"):
        assert html.escape(expected) in page, expected
    assert html.escape(json.dumps(made["pat"].model_dump(mode="json"), indent=2, ensure_ascii=False)) in page
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained


def test_default_documents_monotonic_and_cut_characters(lineage, tmp_path):
    reg, made = lineage
    index = write_inspect_page(reg, "rep", tmp_path / "p", n_docs=2, max_bytes=30)
    page = index.read_bytes().decode()
    first = list(rows_of(reg, made["rep"]))[:2]  # manifest order: the first part's first rows
    assert list(markers(page)) == first
    assert "on the rise H(j) − H(j−1)" in page and "repatched from pat@v1" in page
    assert (tmp_path / "p" / "trace-1.png").exists() and not (tmp_path / "p" / "trace-2.png").exists()
    # Max patch length 3 cuts inside multi-byte characters: those patches get dashed boxes.
    page = write_inspect_page(reg, "rep", tmp_path / "q", doc_ids=["html<&>\"'"]).read_bytes().decode()
    row = rows_of(reg, made["rep"])["html<&>\"'"]
    assert markers(page)["html<&>\"'"] == len(row["patch_lengths"])
    utf8 = DOCS["html<&>\"'"].encode()
    starts = np.concatenate([[0], np.cumsum(row["patch_lengths"])[:-1]])
    inside = sum((utf8[s] & 0xC0) == 0x80 for s in starts)
    assert inside > 0 and page.count('class="patch mid"') == inside


def test_page_without_entropies(lineage, tmp_path):
    reg, made = lineage
    page = write_inspect_page(reg, "nent", tmp_path / "n", doc_ids=["code", "long"]).read_bytes().decode()
    rows = rows_of(reg, made["nent"])
    assert markers(page) == {"code": len(rows["code"]["patch_lengths"]),
                             "long": int((np.cumsum([0] + rows["long"]["patch_lengths"][:-1]) < 2000).sum())}
    assert "no entropies stored" in page and "style=\"background" not in page
    assert not list((tmp_path / "n").glob("trace-*.png"))
    check_png(tmp_path / "n" / "patch-lengths.png")
    assert "scheme space" in page


def test_clear_errors(lineage, tmp_path):
    reg, _ = lineage
    with pytest.raises(RegistryError, match="no dataset named 'ghost'"):
        write_inspect_page(reg, "ghost", tmp_path / "x")
    with pytest.raises(InspectError, match="shuf@v1 is a documents dataset, not patches"):
        write_inspect_page(reg, "shuf", tmp_path / "x")
    with pytest.raises(InspectError, match="document ids not found in pat@v1: 'nope', 'gone'"):
        write_inspect_page(reg, "pat", tmp_path / "x", doc_ids=["code", "nope", "gone"])
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(InspectError, match="cannot write the page to .*file/sub"):
        write_inspect_page(reg, "pat", tmp_path / "file" / "sub")
    assert not (tmp_path / "x").exists()  # nothing written before the checks pass


def test_page_from_s3(s3_bucket, tmp_path):
    reg = Registry(Store.open(f"{s3_bucket}/reg"))
    made = build_lineage(reg, tmp_path)
    page = write_inspect_page(reg, "rep", tmp_path / "page", doc_ids=["tail"]).read_bytes().decode()
    assert markers(page) == {"tail": len(rows_of(reg, made["rep"])["tail"]["patch_lengths"])}
    assert "docs@v1" in page and (tmp_path / "page" / "trace-0.png").exists()


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get update && apt-get install -y chromium` "
                    "(`make test` does this when run as root)")
    profile = cwd / "chromium-profile"
    profile.mkdir()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=cwd)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_page_in_headless_chromium(lineage, tmp_path):
    reg, made = lineage
    ids = ["html<&>\"'", "code", "long"]
    index = write_inspect_page(reg, "pat", tmp_path / "page", doc_ids=ids)
    url = index.resolve().as_uri()

    dom = chromium("--dump-dom", url, cwd=tmp_path).stdout
    counts = markers(dom)  # the DOM as Chromium parsed it: every section and box survived
    assert counts == markers(index.read_bytes().decode()) and set(counts) == set(ids) and all(counts.values())
    text = re.sub(r"<[^>]+>", "", re.search(r'data-doc-id="html[^"]*".*?<div class="doc-text">(.*?)</div>', dom, re.S).group(1))
    assert html.unescape(text) == DOCS["html<&>\"'"]  # the coloured view reads as the document
    assert 'class="trace" src="trace-0.png"' in dom

    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,900", "--hide-scrollbars", url, cwd=tmp_path)
    check_png(shot, min_bytes=20_000)
    import matplotlib.image

    pixels = (matplotlib.image.imread(str(shot))[..., :3] * 255).round().astype(np.int32)
    assert pixels.shape[:2] == (900, 1200)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50  # not blank
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((r > 200) & (g < 170) & (b < 170)).sum() > 500  # entropy shading rendered (reds)
    assert ((b > 120) & (r < 80) & (g < 120)).sum() > 200  # patch-start edges rendered (blue)


def test_page_shows_the_calibration_and_the_dataset_mean(lineage, tmp_path):
    reg, made = lineage
    m = repatch(reg, RepatchConfig(patches="pat", name="sized", rule=PatchRule(target_patch_size=1.8)))  # a step of the fake entropies
    c = m.params["calibration"]
    page = write_inspect_page(reg, "sized", tmp_path / "page").read_text()
    expected = (f"calibrated for 1.8 bytes on all {c['sample_documents']} documents ({c['sample_bytes']:,} bytes): "
                f"sample {c['mean_patch_size_reached']:.3f}, dataset {m.stats.mean_patch_length:.3f}")
    assert html.escape(expected) in page
