"""Qwen2.5-VL on Megatron-Core: the vision tower on the first pipeline stage and the language model
as Megatron's GPTModel with multimodal rotary embeddings (mrope).

Forward takes a padded batch ``[B, S]`` of token ids in which every image is a run of
``image_token_id`` tokens; image embeddings from the ViT replace those tokens' embeddings (in
row-major order, like transformers), and 3D position ids are computed from the image grids when
not given. With ``packed=`` it takes the rows concatenated into one stream ``[1, T]`` instead:
docs/design.md §5.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule

from . import geometry
from .config import QwenVLConfig, check_parallel, language_config, merger_config, recompute_kwargs, vision_config
from .image_dedup import encode_once
from .options import ModelOptions
from .packing import Packing, install_stream_rotary
from .specs import language_layer_spec
from .vision import VisionModel, with_ffn_hidden_size


def transformer_configs(cfg: QwenVLConfig, options: ModelOptions, tp: int = 1, pp: int = 1):
    """The (language model, ViT, merger) TransformerConfigs the model is built from: FP8 reaches the
    ViT and the merger only with ``fp8_vision`` (``Precision.for_part``)."""
    precision = options.precision_config()
    lm = language_config(cfg, tp, pp, precision, **recompute_kwargs(options.recompute))
    return lm, vision_config(cfg, tp, precision), merger_config(cfg, tp, precision)


class QwenVLModel(MegatronModule):
    """One pipeline stage of the Qwen2.5-VL policy."""

    def __init__(self, cfg: QwenVLConfig, options: Optional[ModelOptions] = None, pre_process: bool = True,
                 post_process: bool = True, tp: int = 1, pp: int = 1):
        """``options``: a :class:`ModelOptions` (or the trainer's model config, a subclass); a run passes
        ``options.with_backend(resolved)`` so the backend is decided once, and resolving it again here
        is then the identity."""
        options = options or ModelOptions()
        options.precision_config().check_runtime()
        check_parallel(cfg, tp, pp)
        install_stream_rotary()
        backend = options.resolve_backend()
        lm_config, vit_config, mrg_config = transformer_configs(cfg, options, tp, pp)
        super().__init__(config=lm_config)
        self.cfg, self.backend, self.dedup_images = cfg, backend, options.dedup_images
        self.token_multiple = options.part_token_multiple("language")
        self.model_type = ModelType.encoder_or_decoder  # what Megatron's pipeline schedules look for
        self.pre_process, self.post_process = pre_process, post_process
        self.padded_vocab_size = cfg.padded_vocab_size(max(options.vocab_divisible_by, tp))
        self.vision = None
        if pre_process:
            self.vision = VisionModel(cfg, vit_config, mrg_config, backend,
                                      token_multiple=options.part_token_multiple("vision"))
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

    def _packed_inputs(self, input_ids, attention_mask, position_ids, image_grid_thw, packed: Packing):
        """Position ids and Megatron's PackedSeqParams of a packed stream, after checking the contract."""
        if input_ids.shape != (1, packed.total):
            raise ValueError(f"packed: input_ids must be [1, {packed.total}] (the stream), "
                             f"got {tuple(input_ids.shape)}")
        if attention_mask is not None:
            raise ValueError("packed: no attention_mask; cu_seqlens says which tokens are real and where rows end")
        if self.config.apply_rope_fusion:  # docs/design.md §5, "Rotary"
            raise ValueError("packed: needs apply_rope_fusion=False (the fused THD rotary ignores mrope positions)")
        if self.config.context_parallel_size > 1:
            raise NotImplementedError("packed: context parallelism is not supported (docs/design.md)")
        if position_ids is not None and position_ids.shape != (3, 1, packed.total):
            raise ValueError(f"packed: position_ids must be [3, 1, {packed.total}], got {tuple(position_ids.shape)}")
        if position_ids is None:
            position_ids = geometry.packed_rope_index(input_ids, packed.cu_seqlens, image_grid_thw,
                                                      self.cfg.image_token_id, self.cfg.spatial_merge_size)
        return position_ids, packed.seq_params()

    def _embed(self, input_ids, pixel_values, image_grid_thw) -> torch.Tensor:
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        if pixel_values is None:
            return emb
        image = (encode_once(self.vision, pixel_values, image_grid_thw, self.cfg.spatial_merge_size)
                 if self.dedup_images else self.vision(pixel_values, image_grid_thw)).to(emb.dtype)
        where = (input_ids == self.cfg.image_token_id).nonzero(as_tuple=True)  # row-major (b, s)
        if where[0].numel() != image.shape[0]:
            raise ValueError(f"batch has {where[0].numel()} image tokens but the images give "
                             f"{image.shape[0]} embeddings")
        return emb.transpose(0, 1).index_put(where, image).transpose(0, 1).contiguous()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None, return_hidden: bool = False,
                packed: Optional[Packing] = None) -> torch.Tensor:
        """input_ids/attention_mask [B, S] (mask 1 = real token); returns logits [B, S, V/TP]
        (last stage; gathered over TP with ``runtime_gather_output``), per-token loss with
        ``labels``, or hidden states [S, B, H] on earlier stages. ``return_hidden``: the last stage
        skips the output layer and returns the final (normed) hidden states [S, B, H] too, for
        ``ops.fused_head`` with :meth:`output_weight`.

        ``packed``: input_ids is a packed stream [1, T] laid out by ``packed`` (docs/design.md §5,
        "Layout"; position_ids computed per row when not given), and everything above holds with B = 1,
        S = T."""
        seq_params = None
        if packed is not None:
            position_ids, seq_params = self._packed_inputs(input_ids, attention_mask, position_ids, image_grid_thw,
                                                           packed)
        elif position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw, attention_mask)
        b, s = input_ids.shape
        if (b * s) % self.token_multiple:
            raise ValueError(f"a micro-batch of {b}x{s} tokens: FP8 GEMMs need a multiple of {self.token_multiple}; "
                             f"pad it with dualrpo_mcore.actor.microbatch.pad_tokens")
        # Packed: TE's THD attention takes no mask, and the local one builds its own from cu_seqlens.
        mask = None if packed is not None else geometry.causal_padding_mask(attention_mask, s, b,
                                                                            device=input_ids.device)
        decoder_input = self._embed(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
        kw = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, decoder_input=decoder_input,
                  packed_seq_params=seq_params)
        lm = self.language_model
        if return_hidden and self.post_process:
            if labels is not None or getattr(lm, "mtp_process", False) or lm.config.sequence_parallel:
                raise ValueError("return_hidden: not with labels, multi-token prediction or sequence "
                                 "parallelism (the fused head expects the full [S, B, H] hidden states)")
            # GPTModel returns the decoder's output (its final norm included) right before the output
            # layer when post_process is off; the flag is restored even if the forward raises.
            lm.post_process = False
            try:
                return lm(**kw)
            finally:
                lm.post_process = True
        return lm(**kw, labels=labels, runtime_gather_output=runtime_gather_output)

    def output_weight(self) -> torch.Tensor:
        """This rank's vocabulary shard [V_pad / TP, H] of the output layer, or of the input embedding
        when they are tied (Megatron's own choice of the shared parameter, so its gradient lands where
        the unfused output layer's would). Last pipeline stage only."""
        if not self.post_process:
            raise RuntimeError("output_weight: only the last pipeline stage holds the output layer")
        lm = self.language_model
        if lm.share_embeddings_and_output_weights:
            return lm.shared_embedding_or_output_weight()
        return lm.output_layer.weight


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
