"""Distribution applied to a plain BLT from outside (torchtitan's `parallelize_*` pattern).

Order: activation checkpointing, then `torch.compile`, per transformer block; then FSDP2
(`fully_shard`) on each block of the local encoder, global transformer and local decoder and on
the hash n-gram tables, then on the root. The model file knows none of this.

Mixed precision: on CUDA, bf16 parameters and activations with fp32 gradient reduction
(torchtitan's default); on CPU (gloo tests) everything stays fp32: bf16 on CPUs without native
support is many times slower, and fp32 keeps resumed runs bit-identical.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from blt_model.distributed import Distributed


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    compile: bool = Field(False, description="torch.compile each transformer block (GPU: faster after a warm-up)")
    activation_checkpointing: bool = Field(False, description="recompute block activations in backward to save memory")
    reshard_after_forward: bool = Field(True, description="FSDP2: free gathered weights after forward (ZeRO-3)")


def transformer_blocks(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(block list, index) of every transformer block of a BLT, in forward order."""
    lists = [model.local_encoder.layers, model.global_transformer.layers, model.local_decoder.layers]
    return [(blocks, i) for blocks in lists for i in range(len(blocks))]


def parallelize_blt(model: nn.Module, env: Distributed, cfg: ParallelConfig, bf16: bool) -> nn.Module:
    """Wrap `model` in place and return it. One process: only checkpointing and compile."""
    for blocks, i in transformer_blocks(model):
        block = blocks[i]
        if cfg.activation_checkpointing:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if cfg.compile:
            block = torch.compile(block)
        blocks[i] = block
    if env.world_size == 1:
        return model
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
    )
    shard = dict(mesh=mesh, mp_policy=policy)
    for blocks, i in transformer_blocks(model):
        fully_shard(blocks[i], reshard_after_forward=cfg.reshard_after_forward, **shard)
    fully_shard(model.encoder_hash_tok_embedding, reshard_after_forward=cfg.reshard_after_forward, **shard)
    # The root: the rest (byte embedding, cross-attention, norms, output); kept gathered after
    # forward, since backward needs it first.
    fully_shard(model, reshard_after_forward=False, **shard)
    return model
