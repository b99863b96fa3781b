"""Official WeTok-AR checkpoints: the Lightning ``.ckpt`` of the official GenStage (``Net2NetTransformer``) with
its YAML config.

The generator's weights sit under ``transformer.*`` with the official module names; ours are the same except the
sub-token embeddings (official ``{i}_emb``, ours ``token_emb.{i}``) and the intra-position blocks (official
``factorized_blocks``, ours ``intra_blocks``). A released checkpoint also holds the frozen tokenizer under
``first_stage_model.*``; the official AR stage uses its raw (non-EMA) encoder and decoder, and so do we.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from .. import official as tok_official
from .._files import read_limited
from ..checkpoints import _load_exact
from ..config import WeTokConfig
from ..errors import CheckpointError, InputError
from ..model import WeTok
from ..token_shards import shown
from .checks import check_state_shapes, check_state_values
from .config import WeTokARConfig, get_ar_config, is_ar_preset
from .model import WeTokAR

logger = logging.getLogger("wetok")

TRANSFORMER_PREFIX = "transformer."
TOKENIZER_PREFIX = "first_stage_model."
#: Buffers a GPT may carry that are computed, not learned (RoPE table, causal mask, sampling caches).
_DERIVED_MARKERS = ("freqs_cis", "causal_mask", "kv_cache")


# ------------------------------------------------------------------------------------------------------ configs
def _model_args(data: Any, path: Path) -> dict[str, Any]:
    try:
        model = data["model"]
        args = model.get("init_args", model.get("params"))
        if not isinstance(args, dict):
            raise KeyError("init_args")
        return args
    except (KeyError, TypeError, AttributeError) as err:
        raise InputError(path, f"not an official GenStage config (missing {err})") from err


#: Largest GenStage YAML read (bytes; the official ones are a few KB).
MAX_YAML_BYTES = 1 << 20


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(read_limited(path, MAX_YAML_BYTES, "YAML config").decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as err:
        raise InputError(path, f"cannot read YAML config: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] if lines else type(err).__name__


def read_official_ar_config(path: str | Path) -> WeTokARConfig:
    """Parse ``transformer_config.params`` of an official GenStage YAML into a :class:`WeTokARConfig`."""
    path = Path(path)
    args = _model_args(_read_yaml(path), path)
    try:
        p = args["transformer_config"]["params"]
        bits = [int(b) for b in p["factorized_bits"]]
        groups = int(p.get("factorized_k", len(bits)))
        positions = int(p["block_size"])
        dim = int(p["dim"])
        cond_dim = int(p.get("cond_dim", dim))
        n_head = int(p["n_head"])
        kv_heads = int(p.get("n_kv_head") or n_head)
        side = math.isqrt(positions)
    except (KeyError, TypeError, ValueError, ArithmeticError) as err:
        raise InputError(path, f"not an official GenStage transformer config (missing or bad {_one_line(err)})"
                         ) from err
    problems = []
    if not p.get("token_factorization", args.get("token_factorization", True)):
        problems.append("token_factorization is off (only the factorized GPT is supported)")
    if len(set(bits)) != 1 or len(bits) != groups:
        problems.append(f"factorized_bits {shown(bits)} must be {groups} equal values")
    if side * side != positions:
        problems.append(f"block_size {positions} is not a square grid")
    if cond_dim != dim:
        problems.append(f"cond_dim {cond_dim} differs from dim {dim}")
    if kv_heads != n_head:
        problems.append("grouped-query attention (n_kv_head != n_head) is not supported")
    if problems:
        raise InputError(path, "; ".join(problems))
    try:
        return WeTokARConfig(
            num_classes=int(p.get("class_num", 1000)),
            grid_height=side,
            grid_width=side,
            groups=groups,
            bits_per_group=bits[0],
            dim=dim,
            n_head=int(p["n_head"]),
            spatial_layers=int(p["spatial_n_layer"]),
            intra_layers=int(p["factorized_n_layer"]),
            token_dropout=float(p.get("token_drop", 0.1)),
            resid_dropout=float(p.get("resid_dropout_p", 0.1)),
            ffn_dropout=float(p.get("ffn_dropout_p", 0.1)),
            class_dropout=float(p.get("class_dropout_prob", 0.1)),
            rope_base=float(p.get("rope_base", 10000)),
            name=path.stem,
        )
    except (KeyError, IndexError, TypeError, ValueError, ArithmeticError) as err:
        raise InputError(path, f"invalid GenStage transformer config: {_one_line(err)}") from err


def read_official_tokenizer_config(path: str | Path) -> WeTokConfig | None:
    """The tokenizer configuration in a GenStage YAML (``first_stage_config``), or None if it has none.

    Parsed by the tokenizer's own official-config reader (:func:`wetok.official.read_official_config`), which
    reads a file: the section is handed to it as a small temporary YAML."""
    path = Path(path)
    section = _model_args(_read_yaml(path), path).get("first_stage_config")
    if not isinstance(section, dict):
        return None
    params = section.get("init_args", section.get("params"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_yaml = Path(tmp) / f"{path.stem}.yaml"
        tmp_yaml.write_text(yaml.safe_dump({"model": {"init_args": params}}))
        try:
            return tok_official.read_official_config(tmp_yaml)
        except InputError as err:
            raise InputError(path, f"first_stage_config: {err.reason}") from err


# ------------------------------------------------------------------------------------------------------ weights
def official_to_native_key(key: str) -> str:
    """``transformer.2_emb.weight`` -> ``token_emb.2.weight``, ``transformer.factorized_blocks.`` ->
    ``intra_blocks.``; other names only lose the ``transformer.`` prefix."""
    key = key.removeprefix(TRANSFORMER_PREFIX)
    key = re.sub(r"^(\d+)_emb\.", r"token_emb.\1.", key)
    return re.sub(r"^factorized_blocks\.", "intra_blocks.", key)


def native_to_official_key(key: str) -> str:
    """The inverse of :func:`official_to_native_key`."""
    key = re.sub(r"^token_emb\.(\d+)\.", r"\1_emb.", key)
    key = re.sub(r"^intra_blocks\.", "factorized_blocks.", key)
    return TRANSFORMER_PREFIX + key


def to_official_state_dict(model: WeTokAR) -> dict[str, Tensor]:
    """The generator's weights under the official names (``transformer.*``)."""
    return {native_to_official_key(k): v.detach().clone() for k, v in model.state_dict().items()}


def _resolve_config(config: str | Path | WeTokARConfig) -> tuple[WeTokARConfig, Path | None]:
    if isinstance(config, WeTokARConfig):
        return config, None
    if isinstance(config, str) and is_ar_preset(config) and not Path(config).is_file():
        return get_ar_config(config), None
    path = Path(config)
    if not path.is_file():
        raise InputError(path, "no such config file or generator preset name")
    return read_official_ar_config(path), path


def load_official_ar(
    ckpt: str | Path,
    config: str | Path | WeTokARConfig,
    *,
    tokenizer: bool = True,
    tokenizer_config: str | Path | WeTokConfig | None = None,
    device: torch.device | str | None = None,
) -> WeTokAR:
    """Load an official AR ``.ckpt`` with its GenStage YAML (or a generator preset / :class:`WeTokARConfig`).

    Every ``transformer.*`` key must match the config (missing, unexpected or wrongly shaped keys are a
    :class:`CheckpointError`). With ``tokenizer`` and ``first_stage_model.*`` keys present, the tokenizer is
    loaded from its raw weights into ``.tokenizer``; its configuration comes from ``tokenizer_config`` (an official
    tokenizer YAML, a preset name or a :class:`WeTokConfig`) or else the YAML's ``first_stage_config``.
    """
    ckpt = Path(ckpt)
    cfg, yaml_path = _resolve_config(config)
    try:
        state = tok_official._read_official_state(ckpt)
    except InputError as err:  # torch's unpickling errors run over several lines, with advice not to follow
        reason = err.reason.strip().splitlines()[0] if err.reason.strip() else "unreadable"
        if "Weights only load failed" in reason:
            reason = "cannot read checkpoint: not a torch.save file of tensors and plain values, or a corrupt one"
        raise InputError(ckpt, reason[:300]) from None
    derived = [k for k in state if k.startswith(TRANSFORMER_PREFIX) and any(m in k for m in _DERIVED_MARKERS)]
    native = {official_to_native_key(k): v for k, v in state.items()
              if k.startswith(TRANSFORMER_PREFIX) and k not in derived}
    if derived:
        logger.info("%s: skipped %d derived buffers (%s ...), recomputed here", ckpt, len(derived), derived[0])
    if not native:
        raise CheckpointError(f"{ckpt}: no transformer.* keys: not an official WeTok-AR checkpoint")
    check_state_shapes(cfg, {k: list(v.shape) for k, v in native.items()}, ckpt)  # before anything is built
    check_state_values(native, ckpt)
    model = WeTokAR(cfg)
    _load_exact(model, {k: v.float() for k, v in native.items()}, ckpt)  # type: ignore[arg-type]
    model.eval()
    tok_state = {k.removeprefix(TOKENIZER_PREFIX): v for k, v in state.items() if k.startswith(TOKENIZER_PREFIX)}
    if tokenizer and tok_state:
        model.tokenizer = _load_tokenizer(ckpt, tok_state, tokenizer_config, yaml_path, cfg)
    leftover = [k for k in state if not k.startswith((TRANSFORMER_PREFIX, TOKENIZER_PREFIX))]
    if leftover:
        logger.info("%s: ignored %d keys outside transformer.* / first_stage_model.* (%s ...)",
                    ckpt, len(leftover), leftover[0])
    return model.to(device) if device is not None else model


def _load_tokenizer(ckpt: Path, state: dict[str, Tensor], config: str | Path | WeTokConfig | None,
                    yaml_path: Path | None, ar: WeTokARConfig) -> WeTok:
    if config is not None:
        tok_cfg = tok_official._resolve_config(config)
    elif yaml_path is not None and (found := read_official_tokenizer_config(yaml_path)) is not None:
        tok_cfg = found
    else:
        raise InputError(ckpt, "holds a tokenizer (first_stage_model.*) but no tokenizer config was given "
                               "and the YAML has no first_stage_config")
    if (tok_cfg.groups, tok_cfg.bits_per_group) != (ar.groups, ar.bits_per_group):
        raise CheckpointError(f"{ckpt}: tokenizer has {tok_cfg.groups} x {tok_cfg.bits_per_group}-bit groups, the "
                              f"generator {ar.groups} x {ar.bits_per_group}")
    tok = WeTok(tok_cfg)
    weights = {k: tok_official._official_tensor(k, v.float()) for k, v in state.items()
               if k.startswith(("encoder.", "decoder."))}
    _load_exact(tok, weights, f"{ckpt} (first_stage_model)")
    return tok.eval()
