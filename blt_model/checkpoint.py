"""Training checkpoints of both trainers (the BLT: `train.py`, the entropy model:
`train_entropy.py`): torch DCP for model and optimizer, plus one JSON of train state.

Layout, under a run folder (a model's job folder) on any store (local or s3://):

    checkpoints/step-00000200/           DCP files (each rank writes its shards) + .metadata
    checkpoints/step-00000200/train_state.json   written last, by rank 0

Invariant: a checkpoint exists only once its `train_state.json` does. DCP's files land first
(rank by rank, then DCP's `.metadata`), all ranks meet at a barrier, and only then rank 0
writes the state file in one PUT; so a crash mid-save leaves a folder that `latest_checkpoint`
ignores. The state file carries what is small: the step, the world size, every rank's RNG state
(restored on the same world size), the run's job id (checked on load), and what the trainer adds:
its data position (the BLT: every rank's reader state, gathered, so a different world size can
resume, `blt_data.reader`; the entropy model: one global cursor) and its validation history.

DCP reshards on load: a checkpoint saved by N ranks loads into M ranks, or into one plain
process for `blt-train eval` / `generate`.
"""

from __future__ import annotations

import base64
import json
import re
import warnings
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from blt_data.storage import Store, s3_options
from blt_model.distributed import Distributed, TrainingError

STATE_FILE = "train_state.json"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(run_dir: str, step: int) -> str:
    return f"{run_dir}/checkpoints/step-{step:08d}"


def _storage(store: Store, rel: str, write: bool):
    """A DCP writer/reader for `rel` on the store: plain files locally, fsspec (s3fs) otherwise,
    with the same endpoint and retry settings as every other store call."""
    if store.is_local:
        path = store.path(rel)
        return dcp.FileSystemWriter(path) if write else dcp.FileSystemReader(path)
    url, opts = store.uri(rel), s3_options()
    return FsspecWriter(url, **opts) if write else FsspecReader(url, **opts)


@contextmanager
def _single_process_is_fine():
    """DCP warns on every save and load without a process group; one process is a normal case
    here (blt-train without torchrun, eval, generate)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def set_rng_state(encoded: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8))


def restore_rng(state: dict[str, Any], env: Distributed) -> bool:
    """Set this rank's RNG to its saved state; False (RNG left as seeded) on another world size,
    where ranks have no saved state of their own."""
    if state["world_size"] != env.world_size:
        return False
    set_rng_state(state["rng"][env.rank])
    return True


def save_checkpoint(
    store: Store,
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict[str, Any],
    env: Distributed,
) -> str:
    """Save on every rank (collective). `train_state` must be the same on every rank (gather
    per-rank parts first); the step, world size and every rank's RNG state are added here.
    Returns the checkpoint folder."""
    folder = step_dir(run_dir, step)
    rngs = env.gather(rng_state())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_is_fine():
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=_storage(store, folder, write=True),
                 no_dist=not dist.is_initialized())
    env.barrier()
    if env.is_main:
        state = {"version": STATE_VERSION, "step": step, "world_size": env.world_size, "rng": rngs, **train_state}
        store.write_bytes(f"{folder}/{STATE_FILE}", json.dumps(state, indent=1).encode())
    env.barrier()
    return folder


def checkpoint_steps(store: Store, run_dir: str) -> list[int]:
    """Steps with a complete checkpoint (their state file is there), ascending."""
    root = f"{run_dir}/checkpoints"
    if not store.exists(root):
        return []
    steps = []
    for entry in store.list(root):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = _STEP_DIR.match(name)
        if match and store.exists(f"{root}/{name}/{STATE_FILE}"):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(store: Store, run_dir: str) -> str | None:
    """The folder of the run's latest complete checkpoint: where a rerun of the job resumes."""
    steps = checkpoint_steps(store, run_dir)
    return step_dir(run_dir, steps[-1]) if steps else None


def resume_folder(store: Store, run_dir: str, resume: str | None) -> str | None:
    """The checkpoint a run starts from: `resume` names a folder (relative to the store), "none"
    starts over, None takes the job's latest (None when it has none)."""
    if resume == "none":
        return None
    return resume if resume is not None else latest_checkpoint(store, run_dir)


def read_train_state(store: Store, folder: str, job_id: str | None = None) -> dict[str, Any]:
    uri = store.uri(folder)
    try:
        state = json.loads(store.read_bytes(f"{folder}/{STATE_FILE}"))
    except FileNotFoundError:
        raise TrainingError(f"{uri} is not a complete checkpoint (no {STATE_FILE}; a save that did not finish?)") from None
    except ValueError as e:
        raise TrainingError(f"{uri}/{STATE_FILE} is corrupt ({e}); resume from an earlier checkpoint") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise TrainingError(f"{uri}/{STATE_FILE} is not a version-{STATE_VERSION} train state")
    if job_id is not None and state.get("job_id") != job_id:
        raise TrainingError(
            f"{uri} belongs to job {state.get('job_id')}, not {job_id}: its config or dataset differs"
        )
    return state


def load_checkpoint(
    store: Store,
    folder: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    job_id: str | None = None,
    collective: bool | None = None,
) -> dict[str, Any]:
    """Load model (and optimizer) weights in place, on every rank; returns the train state.
    collective=False: this process reads alone, into a plain model (default: when a process
    group exists)."""
    no_dist = not dist.is_initialized() if collective is None else not collective
    state = read_train_state(store, folder, job_id)
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else (get_state_dict(model, [])[0], None)
    target: dict[str, Any] = {"model": model_sd}
    if optim_sd is not None:
        target["optim"] = optim_sd
    try:
        with _single_process_is_fine():
            dcp.load(target, storage_reader=_storage(store, folder, write=False), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # CheckpointException (per-rank errors) is a BaseException
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise TrainingError(
            f"checkpoint {store.uri(folder)} is unreadable ({type(e).__name__}: {reason}); "
            "resume from an earlier one or delete it"
        ) from None
    set_state_dict(
        model, optimizer if optimizer is not None else [],
        model_state_dict=target["model"], optim_state_dict=target.get("optim", {}),
    )
    return state


def checkpoint_files(store: Store, folder: str) -> list[str]:
    """Every file of a checkpoint, relative to the store root (for the registry manifest)."""
    return sorted(store.find(folder))
