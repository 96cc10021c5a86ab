"""One resolver from a :class:`~.config.ModelSourceConfig` to the policy's HF config, for every kind
of source: ``hf_dir``, ``megatron_ckpt`` (``dualrpo convert`` output), ``preset``, and ``tiny``
(with a ready ``hf_config`` or ``tiny_overrides`` of the "tiny" preset).

The Megatron side (:func:`.megatron_setup.resolve_model_config`), the rollout engine and the HF
export all ask here, so they cannot disagree on the architecture of the same source.
"""
from __future__ import annotations

import json
import os
from typing import Any

from dualrpo_mcore.actor.config import ModelSourceConfig


def hf_config_source(src: ModelSourceConfig) -> Any:
    """The source's HF config in the form it is stored in: the ``hf_dir`` path, the dict a Megatron
    checkpoint's ``meta.json`` carries, the preset's dict, the given ``hf_config``, or the tiny
    preset's config object. :func:`.models.qwen2_5_vl.from_hf` reads every one of these as is, so the
    Megatron config (and the ``hf`` dict it writes into checkpoints) stays exactly what was given."""
    from dualrpo_mcore.models.qwen2_5_vl import presets

    if src.hf_dir:
        return src.hf_dir
    if src.megatron_ckpt:
        meta = os.path.join(src.megatron_ckpt, "meta.json")
        try:
            with open(meta) as f:
                return json.load(f)["hf_config"]
        except FileNotFoundError:
            raise FileNotFoundError(f"actor.model.megatron_ckpt: {meta} is missing; is {src.megatron_ckpt} "
                                    f"a checkpoint written by `dualrpo convert`?") from None
        except KeyError:
            raise ValueError(f"actor.model.megatron_ckpt: {meta} has no 'hf_config'; it was not written by "
                             f"`dualrpo convert`") from None
    if src.hf_config is not None:  # before preset, as the actor has always read it
        return src.hf_config
    if src.preset:
        return presets.hf_config_dict(src.preset)
    if not src.tiny:  # ModelSourceConfig.__post_init__ allows no other case; say so if it ever changes
        raise ValueError("actor.model: give one of hf_dir, megatron_ckpt, preset or tiny")
    return presets.hf_config("tiny", **src.tiny_overrides)


def hf_config(src: ModelSourceConfig):
    """The source's HF config as a transformers config object (what the rollout engine and
    ``save_pretrained`` take)."""
    from transformers import AutoConfig, PretrainedConfig, Qwen2_5_VLConfig

    raw = hf_config_source(src)
    if isinstance(raw, PretrainedConfig):
        return raw
    if isinstance(raw, (str, os.PathLike)):
        return AutoConfig.from_pretrained(raw)
    if isinstance(raw, dict):  # from_dict: the path AutoConfig takes for a config.json
        return Qwen2_5_VLConfig.from_dict(raw)
    raise TypeError(f"actor.model.hf_config: expected a transformers config or a dict, got {type(raw).__name__}")
