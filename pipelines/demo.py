"""The demo on embedded defaults: the ``stdlib`` corpus → documents → shuffled documents.

Every step is a registry job, so a second run finds each committed version and reuses it.
Later steps (patching with the shipped entropy model, a short BLT training) join here.
"""

from __future__ import annotations

from blt_data.download import DownloadConfig, download
from blt_data.registry import Manifest, Registry
from blt_data.shuffle import shuffle_documents

DEMO_CORPUS = "stdlib"
DEMO_SHUFFLED = "stdlib-shuffled"


def run_demo(registry: Registry, progress: bool = True) -> list[Manifest]:
    docs = download(registry, DownloadConfig(source="stdlib", name=DEMO_CORPUS), progress=progress)
    shuffled = shuffle_documents(
        registry, docs.ref, DEMO_SHUFFLED,
        num_chunks=4, seed=0, memory_bytes=64 * 10**6, val_docs=100, progress=progress,
    )
    return [docs, shuffled]
