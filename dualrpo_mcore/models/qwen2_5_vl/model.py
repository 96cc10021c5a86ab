"""Qwen2.5-VL on Megatron-Core: the vision tower on the first pipeline stage and the language model
as Megatron's GPTModel with multimodal rotary embeddings (mrope).

Forward takes a padded batch ``[B, S]`` of token ids in which every image is a run of
``image_token_id`` tokens; image embeddings from the ViT replace those tokens' embeddings (in
row-major order, like transformers), and 3D position ids are computed from the image grids when
not given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule

from . import geometry
from .config import (RECOMPUTE, QwenVLConfig, check_parallel, language_config, merger_config, recompute_kwargs,
                     vision_config)
from .image_dedup import encode_once
from .precision import Precision, check_pad_tokens_to
from .specs import language_layer_spec, resolve_backend
from .vision import VisionModel, with_ffn_hidden_size


@dataclass
class ModelOptions:
    """How to build the policy (beyond what config.json says)."""

    precision: Precision = field(default_factory=Precision)
    """Numeric format (dtype, FP8)."""
    backend: str = "auto"
    """'auto', 'te' or 'local' (Megatron-only modules; CPU): see ``specs.resolve_backend``. The built
    model keeps the resolved value as ``QwenVLModel.backend``."""
    vocab_divisible_by: int = 128
    """The embedding/output rows are padded to a multiple of this (and of TP)."""
    recompute: str = "none"
    """Activation recomputation of the language model: 'none', 'selective' (attention core) or
    'full' (every layer's input is kept, the layer re-run in backward)."""
    dedup_images: bool = True
    """Encode each distinct image of a batch once (GRPO's G rows of a prompt share its image); the
    result is the same, the ViT's compute and activations shrink by up to G. See ``image_dedup``."""
    pad_tokens_to: Optional[int] = None
    """Token multiple the inputs are padded to (masked out): None = what the precision's FP8 GEMMs
    need (``Precision.token_multiple``; nothing without FP8). Set it without FP8 to run the padded
    path on CPU. The ViT pads its patches itself; LM batches must arrive padded (``trainer.microbatch``)."""

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r}: choose one of {RECOMPUTE}")
        check_pad_tokens_to(self.pad_tokens_to, self.precision, "pad_tokens_to")

    def token_multiple(self, part: str = "language") -> int:
        """Tokens of ``part``'s GEMM inputs are padded to a multiple of this."""
        return self.pad_tokens_to or self.precision.for_part(part).token_multiple


def transformer_configs(cfg: QwenVLConfig, options: ModelOptions, tp: int = 1, pp: int = 1):
    """The (language model, ViT, merger) TransformerConfigs the model is built from: FP8 reaches the
    ViT and the merger only with ``precision.fp8_vision`` (``Precision.for_part``)."""
    lm = language_config(cfg, tp, pp, options.precision, **recompute_kwargs(options.recompute))
    return lm, vision_config(cfg, tp, options.precision), merger_config(cfg, tp, options.precision)


class QwenVLModel(MegatronModule):
    """One pipeline stage of the Qwen2.5-VL policy."""

    def __init__(self, cfg: QwenVLConfig, options: Optional[ModelOptions] = None, pre_process: bool = True,
                 post_process: bool = True, tp: int = 1, pp: int = 1):
        options = options or ModelOptions()
        options.precision.check_runtime()
        check_parallel(cfg, tp, pp)
        backend = resolve_backend(options.backend, needs_te=options.precision.uses_te)
        lm_config, vit_config, mrg_config = transformer_configs(cfg, options, tp, pp)
        super().__init__(config=lm_config)
        self.cfg, self.backend, self.dedup_images = cfg, backend, options.dedup_images
        self.token_multiple = options.token_multiple("language")
        self.model_type = ModelType.encoder_or_decoder  # what Megatron's pipeline schedules look for
        self.pre_process, self.post_process = pre_process, post_process
        self.padded_vocab_size = cfg.padded_vocab_size(max(options.vocab_divisible_by, tp))
        self.vision = None
        if pre_process:
            self.vision = VisionModel(cfg, vit_config, mrg_config, backend,
                                      token_multiple=options.token_multiple("vision"))
        self.language_model = GPTModel(
            config=lm_config,
            transformer_layer_spec=with_ffn_hidden_size(language_layer_spec(backend), lm_config.ffn_hidden_size),
            vocab_size=self.padded_vocab_size, max_sequence_length=cfg.max_position_embeddings,
            pre_process=pre_process, post_process=post_process, parallel_output=True,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="mrope", rotary_base=cfg.rope_theta)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's activations in here."""
        self.language_model.set_input_tensor(input_tensor)

    def position_ids(self, input_ids, image_grid_thw=None, attention_mask=None) -> torch.Tensor:
        pos, _ = geometry.rope_index(input_ids, image_grid_thw, self.cfg.image_token_id,
                                     self.cfg.spatial_merge_size, attention_mask)
        return pos

    def _embed(self, input_ids, pixel_values, image_grid_thw) -> torch.Tensor:
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        if pixel_values is None:
            return emb
        if self.dedup_images:
            image = encode_once(self.vision, pixel_values, image_grid_thw, self.cfg.spatial_merge_size)
        else:
            image = self.vision(pixel_values, image_grid_thw)
        image = image.to(emb.dtype)
        where = (input_ids == self.cfg.image_token_id).nonzero(as_tuple=True)  # row-major (b, s)
        if where[0].numel() != image.shape[0]:
            raise ValueError(f"batch has {where[0].numel()} image tokens but the images give "
                             f"{image.shape[0]} embeddings")
        return emb.transpose(0, 1).index_put(where, image).transpose(0, 1).contiguous()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None) -> torch.Tensor:
        """input_ids/attention_mask [B, S] (mask 1 = real token); returns logits [B, S, V/TP]
        (last stage; gathered over TP with ``runtime_gather_output``), per-token loss with
        ``labels``, or hidden states [S, B, H] on earlier stages."""
        if position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw, attention_mask)
        b, s = input_ids.shape
        if (b * s) % self.token_multiple:
            raise ValueError(f"a micro-batch of {b}x{s} tokens: FP8 GEMMs need a multiple of {self.token_multiple}; "
                             f"pad it with dualrpo_mcore.trainer.microbatch.pad_tokens")
        mask = geometry.causal_padding_mask(attention_mask, s, b, device=input_ids.device)
        decoder_input = self._embed(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
        return self.language_model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                                   decoder_input=decoder_input, labels=labels,
                                   runtime_gather_output=runtime_gather_output)


def build_model(hf_config, options: Optional[ModelOptions] = None) -> QwenVLModel:
    """This rank's stage of the model, from a HF config (path, dict or config object), using
    Megatron's initialised parallel state."""
    from megatron.core import parallel_state as ps

    from .config import from_hf

    cfg = hf_config if isinstance(hf_config, QwenVLConfig) else from_hf(hf_config)
    pp = ps.get_pipeline_model_parallel_world_size()
    rank = ps.get_pipeline_model_parallel_rank()
    return QwenVLModel(cfg, options, pre_process=rank == 0, post_process=rank == pp - 1,
                       tp=ps.get_tensor_model_parallel_world_size(), pp=pp)
