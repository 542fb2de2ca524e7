"""Our BLT in Meta's and Hugging Face's terms: configs and state dicts, both ways.

- Meta (`bytelatent`): the args dict of `ByteLatentTransformerArgs` (`params.json["model"]`,
  or a hub `config.json["args"]`). State dicts need no conversion: `BLT.state_dict()` has Meta's
  keys and shapes (RoPE tables are non-persistent buffers in Meta's code, so absent from both).
- Hugging Face transformers (`model_type: "blt"`, `BltForCausalLM`): the `BltConfig` dict and
  the key names of transformers' own conversion script (`convert_blt_weights_to_hf.py`): a
  `model.` prefix, Llama-style module names, the hash tables fused into one embedding (table i
  at rows i*vocab ... (i+1)*vocab - 1) and the output as `lm_head`.

Invariant: every conversion is total and exact. A config option we do not compute is refused by
name, and a state dict is checked tensor by tensor against the shapes `BLT(config)` has: a
missing, unexpected or misshapen tensor is an `InteropError` naming it. Ours -> HF -> ours and
Meta -> ours -> Meta give back what went in.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from blt_model.blt import BLT, BLTConfig
from blt_model.entropy_model import EntropyModelConfig
from blt_model.layers import ffn_hidden_dim


class InteropError(ValueError):
    """A config or state dict that does not describe a BLT we compute (names what differs)."""


# Meta args whose value must be this for the function we compute (the released models').
_META_REQUIRED: dict[str, Any] = {
    "cross_attn_encoder": True,
    "cross_attn_decoder": True,
    "use_local_encoder_transformer": True,
    "cross_attn_init_by_pooling": True,
    "downsampling_by_pooling": "max",
    "share_encoder_decoder_emb": True,
    "use_rope": True,
    "non_linearity": "swiglu",
    "norm_type": "rmsnorm",
    "weight_tying": False,
    "encoder_enable_byte_ngrams": False,
}
# Meta args that must be unset (None) or 0.
_META_UNSET = (
    "dim_token", "head_dim", "n_kv_heads", "n_kv_heads_global", "init_base_std",
    "cross_attn_window_encoder", "cross_attn_window_decoder", "encoder_ngram_to_size_str",
    "pm_size", "dim_token_emb", "dim_patch_emb",
)  # fmt: skip
# Meta's defaults (ByteLatentTransformerArgs / BaseTransformerArgs) for fields a params.json
# may leave out: a missing field means Meta's default, not ours.
_META_DEFAULTS: dict[str, Any] = {
    "vocab_size": -1, "dim_global": 512, "dim_local_encoder": 512, "dim_local_decoder": 512,
    "n_layers_global": 8, "n_layers_local_encoder": 8, "n_layers_local_decoder": 8,
    "n_heads_global": 8, "n_heads_local_encoder": 8, "n_heads_local_decoder": 8,
    "cross_attn_k": None, "cross_attn_nheads": None, "cross_attn_all_layers_encoder": False,
    "cross_attn_all_layers_decoder": False, "cross_attn_init_by_pooling": False,
    "downsampling_by_pooling": None, "encoder_hash_byte_group_size": None,
    "encoder_hash_byte_group_vocab": 30000, "encoder_hash_byte_group_nb_functions": 3,
    "rope_theta": 10000.0, "local_attention_window_len": None, "norm_eps": 1e-5,
    "multiple_of": 256, "ffn_dim_multiplier": 1.0, "init_std_factor": "disabled",
    "cross_attn_encoder": False, "cross_attn_decoder": False,
    "use_local_encoder_transformer": False, "share_encoder_decoder_emb": True, "use_rope": True,
    "non_linearity": "swiglu", "norm_type": "rmsnorm", "weight_tying": False,
    "encoder_enable_byte_ngrams": False, "pm_size": 0,
}  # fmt: skip
# Fields with the same name and meaning in BLTConfig and Meta's args.
_SHARED_FIELDS = [
    name for name in BLTConfig.model_fields if name not in ("cross_attn_init_by_pooling",)
]


def config_from_meta_args(args: Mapping[str, Any]) -> BLTConfig:
    """BLTConfig from Meta's `ByteLatentTransformerArgs` dict; refuses options we do not compute."""
    get = lambda name: args.get(name, _META_DEFAULTS.get(name))  # noqa: E731
    for name, value in _META_REQUIRED.items():
        if get(name) != value:
            raise InteropError(f"Meta arg {name}={get(name)!r} is not supported (need {value!r})")
    for name in _META_UNSET:
        if args.get(name) not in (None, 0):
            raise InteropError(f"Meta arg {name}={args[name]!r} is not supported (need unset)")
    fields = {name: get(name) for name in _SHARED_FIELDS}
    sizes = fields["encoder_hash_byte_group_size"]
    if isinstance(sizes, str):  # Meta accepts "3,4,5" as well as a list
        fields["encoder_hash_byte_group_size"] = [int(x) for x in sizes.split(",") if x]
    for name in ("cross_attn_k", "cross_attn_nheads", "local_attention_window_len"):
        if fields[name] is None:
            raise InteropError(f"Meta arg {name} is unset; the BLTs we compute need a value")
    try:
        return BLTConfig(**fields)
    except ValueError as err:
        raise InteropError(f"Meta args do not describe a supported BLT: {err}") from None


def meta_args_from_config(config: BLTConfig) -> dict[str, Any]:
    """Meta's `ByteLatentTransformerArgs` dict for `config` (the `model` section of a
    params.json, or `config.json["args"]` of the hub layout). Fields that do not change the
    function (sequence lengths for RoPE tables, attention backend) get the released values."""
    args = {name: getattr(config, name) for name in _SHARED_FIELDS}
    args["encoder_hash_byte_group_size"] = list(config.encoder_hash_byte_group_size)
    args |= dict(_META_REQUIRED)
    args |= {
        "dim": config.dim_global,
        "n_layers": config.n_layers_global,
        "n_heads": config.n_heads_global,
        "patch_in_forward": False,
        "patching_mode": "entropy",
        "patch_size": 4.5,  # Meta's LocalModelArgs needs a number (only static patching reads it)
        "max_seqlen": 4096,
        "max_encoder_seq_length": 24576,
        "attn_impl": "xformers",
        "attn_bias_type": "block_causal",
    }
    return args


def _rope(theta: float) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


def hf_config_from_config(
    config: BLTConfig, patcher_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """transformers' `BltConfig` dict (config.json) for `config`; `patcher_config` (a
    `BltPatcherConfig` dict) makes it patch in forward with its entropy model.

    transformers computes one cross-attention head count per local model (its self-attention
    heads) and re-pools patch queries before every encoder cross-attention, so a BLT whose
    cross_attn_nheads differs, or with cross_attn_all_layers_encoder over several encoder
    layers, has no transformers equivalent and is refused.
    """
    cfg = config
    for name in ("n_heads_local_encoder", "n_heads_local_decoder"):
        if getattr(cfg, name) != cfg.cross_attn_nheads:
            raise InteropError(f"transformers' BLT needs {name} == cross_attn_nheads")
    if cfg.cross_attn_all_layers_encoder and cfg.n_layers_local_encoder > 1:
        raise InteropError(
            "transformers' BLT computes cross_attn_all_layers_encoder differently from Meta's "
            "for more than one encoder layer"
        )

    def local(dim: int, heads: int, layers: int, all_layers: bool) -> dict[str, Any]:
        return {
            "vocab_size": cfg.vocab_size,
            "cross_attn_all_layers": all_layers,
            "cross_attn_k": cfg.cross_attn_k,
            "hidden_size_global": cfg.dim_global,
            "hidden_size": dim,
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": _rope(cfg.rope_theta),
            "hidden_act": "silu",
            "intermediate_size": ffn_hidden_dim(dim, cfg.ffn_dim_multiplier, cfg.multiple_of),
            "max_position_embeddings": 24576,
        }

    return {
        "model_type": "blt",
        "architectures": ["BltForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "patch_in_forward": patcher_config is not None,
        "patching_mode": "entropy",
        "local_attention_window_len": cfg.local_attention_window_len,
        "cross_attn_k": cfg.cross_attn_k,
        "encoder_hash_byte_group_size": list(cfg.encoder_hash_byte_group_size),
        "encoder_hash_byte_group_vocab": cfg.encoder_hash_byte_group_vocab,
        "encoder_hash_byte_group_nb_functions": cfg.encoder_hash_byte_group_nb_functions,
        "rope_parameters": _rope(cfg.rope_theta),
        "tie_word_embeddings": False,
        "encoder_config": local(
            cfg.dim_local_encoder, cfg.n_heads_local_encoder, cfg.n_layers_local_encoder,
            cfg.cross_attn_all_layers_encoder,
        ),
        "decoder_config": local(
            cfg.dim_local_decoder, cfg.n_heads_local_decoder, cfg.n_layers_local_decoder,
            cfg.cross_attn_all_layers_decoder,
        ),
        "global_config": {
            "hidden_size": cfg.dim_global,
            "num_attention_heads": cfg.n_heads_global,
            "num_hidden_layers": cfg.n_layers_global,
            "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": _rope(cfg.rope_theta),
            "hidden_act": "silu",
            "intermediate_size": ffn_hidden_dim(
                cfg.dim_global, cfg.ffn_dim_multiplier, cfg.multiple_of
            ),
            "max_position_embeddings": 4096,
        },
        **({"patcher_config": dict(patcher_config)} if patcher_config is not None else {}),
    }


def _theta(section: Mapping[str, Any]) -> float | None:
    rope = section.get("rope_parameters") or {}
    return rope.get("rope_theta", section.get("rope_theta"))


def config_from_hf_config(hf: Mapping[str, Any]) -> BLTConfig:
    """BLTConfig from a transformers `BltConfig` dict (config.json, `model_type: "blt"`)."""
    if hf.get("model_type") != "blt":
        raise InteropError(f"not a transformers BLT config (model_type {hf.get('model_type')!r})")
    sections = ("encoder_config", "decoder_config", "global_config")
    enc, dec, glob = (hf.get(name) or {} for name in sections)
    thetas = {_theta(s) for s in (enc, dec, glob)} - {None}
    if len(thetas) > 1:
        raise InteropError(f"local and global RoPE theta differ ({sorted(thetas)}): unsupported")
    for name, section in zip(sections, (enc, dec, glob)):
        if section.get("num_key_value_heads") not in (None, section.get("num_attention_heads")):
            raise InteropError(f"{name}.num_key_value_heads (grouped-query) is unsupported")
    try:
        config = BLTConfig(
            vocab_size=hf.get("vocab_size", 260),
            dim_global=glob["hidden_size"],
            dim_local_encoder=enc["hidden_size"],
            dim_local_decoder=dec["hidden_size"],
            n_layers_global=glob["num_hidden_layers"],
            n_layers_local_encoder=enc["num_hidden_layers"],
            n_layers_local_decoder=dec["num_hidden_layers"],
            n_heads_global=glob["num_attention_heads"],
            n_heads_local_encoder=enc["num_attention_heads"],
            n_heads_local_decoder=dec["num_attention_heads"],
            cross_attn_k=hf.get("cross_attn_k", 2),
            cross_attn_nheads=enc["num_attention_heads"],
            cross_attn_all_layers_encoder=enc.get("cross_attn_all_layers", False),
            cross_attn_all_layers_decoder=dec.get("cross_attn_all_layers", True),
            encoder_hash_byte_group_size=(
                hf.get("encoder_hash_byte_group_size") or [3, 4, 5, 6, 7, 8]
            ),
            encoder_hash_byte_group_vocab=hf.get("encoder_hash_byte_group_vocab", 500002),
            encoder_hash_byte_group_nb_functions=hf.get("encoder_hash_byte_group_nb_functions", 1),
            rope_theta=thetas.pop() if thetas else 500000.0,
            local_attention_window_len=hf.get("local_attention_window_len", 512),
            norm_eps=glob.get("rms_norm_eps", 1e-5),
        )
    except KeyError as err:
        raise InteropError(f"transformers BLT config lacks {err}") from None
    except (TypeError, ValueError) as err:
        raise InteropError(f"transformers BLT config is not a supported BLT: {err}") from None
    if dec["num_attention_heads"] != config.cross_attn_nheads:
        raise InteropError(
            "transformers BLT config: encoder and decoder heads differ, but they are both "
            "its cross-attention heads (cross_attn_nheads, one number)"
        )
    for name, section, dim in (
        ("encoder_config", enc, config.dim_local_encoder),
        ("decoder_config", dec, config.dim_local_decoder),
        ("global_config", glob, config.dim_global),
    ):
        want = ffn_hidden_dim(dim, config.ffn_dim_multiplier, config.multiple_of)
        if section.get("intermediate_size", want) != want:
            raise InteropError(
                f"{name}.intermediate_size {section['intermediate_size']} is not Meta's {want}"
            )
    return config


# Module names of transformers' BLT, one path component at a time (a bijection).
_TO_HF = {
    "attention": "self_attn", "feed_forward": "mlp", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "tok_embeddings": "embed_tokens",
    "cross_attn_norm_q": "q_norm", "cross_attn_norm_kv": "k_norm", "w1": "gate_proj",
    "w2": "down_proj", "w3": "up_proj", "wq": "q_proj", "wk": "k_proj", "wv": "v_proj",
    "wo": "o_proj",
}  # fmt: skip
_FROM_HF = {v: k for k, v in _TO_HF.items()}
_HF_HASH = "model.encoder_hash_tok_embedding.weight"
_HF_HEAD = "lm_head.weight"
_OUR_HEAD = "local_decoder.output.weight"
_HASH_PREFIX = "encoder_hash_tok_embedding."
_HF_PATCHER_PREFIX = "model.patcher."


def expected_shapes(config: BLTConfig) -> dict[str, torch.Size]:
    """Key -> shape of `BLT(config).state_dict()` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = BLT(config)
    return {key: value.shape for key, value in model.state_dict().items()}


def check_state_dict(state_dict: Mapping[str, torch.Tensor], config: BLTConfig) -> None:
    """Every tensor of `BLT(config)` present with its shape and nothing else, or InteropError."""
    expected = expected_shapes(config)
    for key in sorted(expected.keys() - state_dict.keys()):
        raise InteropError(f"missing tensor {key} {tuple(expected[key])}")
    for key in sorted(state_dict.keys() - expected.keys()):
        raise InteropError(f"unexpected tensor {key} {tuple(state_dict[key].shape)}")
    for key, shape in expected.items():
        if state_dict[key].shape != shape:
            raise InteropError(
                f"tensor {key} has shape {tuple(state_dict[key].shape)}, expected {tuple(shape)}"
            )


def _rename(key: str, table: Mapping[str, str]) -> str:
    return ".".join(table.get(part, part) for part in key.split("."))


def state_dict_to_hf(
    state_dict: Mapping[str, torch.Tensor],
    config: BLTConfig,
    patcher_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Our (= Meta's) state dict -> transformers' `BltForCausalLM` keys; with
    `patcher_state_dict` (from `entropy_state_dict_to_hf`) under `model.patcher.`."""
    check_state_dict(state_dict, config)
    num_tables = config.encoder_hash_byte_group_nb_functions * len(
        config.encoder_hash_byte_group_size
    )
    tables = [state_dict[f"{_HASH_PREFIX}{i}.weight"] for i in range(num_tables)]
    out = {_HF_HASH: torch.cat(tables)}  # table i at rows i*vocab ... (i+1)*vocab - 1
    out[_HF_HEAD] = state_dict[_OUR_HEAD]
    for key, value in state_dict.items():
        if not key.startswith(_HASH_PREFIX) and key != _OUR_HEAD:
            out["model." + _rename(key, _TO_HF)] = value
    for key, value in (patcher_state_dict or {}).items():
        out[_HF_PATCHER_PREFIX + key] = value
    return out


def state_dict_from_hf(
    hf_state_dict: Mapping[str, torch.Tensor], config: BLTConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """transformers' `BltForCausalLM` state dict -> (ours = Meta's, the patcher's tensors
    without their `model.patcher.` prefix, empty when it has none). Strict: any other tensor
    that is not ours, or a missing or misshapen one, is an InteropError naming it."""
    ours: dict[str, torch.Tensor] = {}
    patcher: dict[str, torch.Tensor] = {}
    vocab = config.encoder_hash_byte_group_vocab
    for key, value in hf_state_dict.items():
        if key.startswith(_HF_PATCHER_PREFIX):
            patcher[key[len(_HF_PATCHER_PREFIX) :]] = value
        elif key == _HF_HEAD:
            ours[_OUR_HEAD] = value
        elif key == _HF_HASH:
            num_tables, rest = divmod(value.shape[0], vocab)
            if rest:
                raise InteropError(f"tensor {key}: {value.shape[0]} rows, not a multiple of {vocab}")
            for i in range(num_tables):
                ours[f"{_HASH_PREFIX}{i}.weight"] = value[i * vocab : (i + 1) * vocab]
        elif key.startswith("model."):
            ours[_rename(key[len("model.") :], _FROM_HF)] = value
        else:
            raise InteropError(f"unexpected tensor {key} in a transformers BLT state dict")
    check_state_dict(ours, config)
    return ours, patcher


# The entropy model as transformers' `BltPatcher` (the patcher inside a BLT checkpoint).
_ENTROPY_TO_HF = {"output": "lm_head"} | _TO_HF


def hf_patcher_config(config: EntropyModelConfig) -> dict[str, Any]:
    """transformers' `BltPatcherConfig` dict for our entropy model."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "max_position_embeddings": config.max_seqlen,
        "rms_norm_eps": config.norm_eps,
        "intermediate_size": ffn_hidden_dim(config.dim, config.ffn_dim_multiplier),
        "rope_parameters": _rope(config.rope_theta),
        "sliding_window": config.window,
    }


def entropy_config_from_hf_patcher(hf: Mapping[str, Any]) -> EntropyModelConfig:
    """Our entropy model's config from a `BltPatcherConfig` dict (`patcher_config`)."""
    if hf.get("num_key_value_heads") not in (None, hf.get("num_attention_heads")):
        raise InteropError("patcher num_key_value_heads (grouped-query) is unsupported")
    if hf.get("sliding_window") is None:
        raise InteropError("patcher without a sliding window is unsupported")
    try:
        config = EntropyModelConfig(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            window=hf["sliding_window"],
            max_seqlen=hf.get("max_position_embeddings", 8192),
            vocab_size=hf.get("vocab_size", 260),
            rope_theta=_theta(hf) or 10000.0,
            norm_eps=hf.get("rms_norm_eps", 1e-5),
        )
    except KeyError as err:
        raise InteropError(f"transformers patcher config lacks {err}") from None
    except (TypeError, ValueError) as err:
        raise InteropError(f"transformers patcher config is not supported: {err}") from None
    want = ffn_hidden_dim(config.dim, config.ffn_dim_multiplier)
    if hf.get("intermediate_size", want) != want:
        raise InteropError(f"patcher intermediate_size {hf['intermediate_size']} is not Meta's {want}")
    return config


def entropy_state_dict_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (= Meta's) entropy model keys -> `BltPatcher`'s (no `model.patcher.` prefix)."""
    return {_rename(key, _ENTROPY_TO_HF): value for key, value in state_dict.items()}


def entropy_state_dict_from_hf(hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`BltPatcher` keys -> ours; check with `entropy_model.load_checked_state_dict`."""
    back = {v: k for k, v in _ENTROPY_TO_HF.items()}
    return {_rename(key, back): value for key, value in hf_state_dict.items()}
