"""Analytic FLOPs of Qwen2.5-VL: forward of one batch, and a training step (forward + backward).

Only matrix multiplications are counted (2 FLOPs per multiply-add): norms, rotary embeddings,
softmax and activations are a fraction of a percent at real sizes and are what
``torch.utils.flop_counter.FlopCounterMode`` leaves out too, which is the reference the unit test
compares against (transformers' model, eager attention).

Terms, for the *actual* shapes of a batch:

* language model, per row of length S: Q/O projections (h x h), K/V projections with grouped-query
  attention (h x kv_heads * head_dim), attention scores QK^T and the weighted sum AV
  (2 x 2 * S^2 * heads * head_dim: the full S x S product, the PaLM/Megatron "model FLOPs"
  convention that dense kernels compute; ``causal=True`` halves it, as FlashAttention executes),
  the gated MLP (gate, up, down), and the output layer over the vocabulary (the padded vocab
  Megatron computes by default);
* vision encoder, per image: the patch embedding (a linear map of the C*T*P*P patch), per block the
  fused QKV and output projections and the gated MLP, attention within windows of
  ``window_size / merge / patch`` merged units on a side (edge windows smaller) in most blocks and
  within whole frames in ``fullatt_block_indexes``, and the patch merger (4d -> 4d -> LM hidden).

Training: backward costs two forwards (gradients w.r.t. inputs and weights), so a step is 3x the
forward; ``recompute='full'`` re-runs the language model's forward once more in backward
(recomputation is applied to the LM only in this model, see ``ModelOptions.recompute``), and
``'selective'`` re-runs its attention core (the score terms). MFU uses the model FLOPs (no
recomputation); the recomputed FLOPs give the hardware utilisation (HFU).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

from dualrpo_mcore.models.qwen2_5_vl.config import RECOMPUTE


@dataclass
class ForwardFlops:
    """Forward FLOPs of one batch, by term."""

    lm_linear: float = 0.0
    """Q, K, V, O projections and the gated MLP of every LM layer."""
    lm_attention: float = 0.0
    """QK^T and AV of every LM layer."""
    lm_output: float = 0.0
    """The output layer (hidden -> vocab)."""
    vision_patch: float = 0.0
    """Patch embedding."""
    vision_linear: float = 0.0
    """QKV, output projection and gated MLP of every ViT block."""
    vision_attention: float = 0.0
    """QK^T and AV within windows / frames."""
    merger: float = 0.0
    """Patch merger MLP."""

    @property
    def lm(self) -> float:
        return self.lm_linear + self.lm_attention + self.lm_output

    @property
    def vision(self) -> float:
        return self.vision_patch + self.vision_linear + self.vision_attention + self.merger

    @property
    def total(self) -> float:
        return self.lm + self.vision

    def as_dict(self) -> Dict[str, float]:
        return dict(asdict(self), lm=self.lm, vision=self.vision, total=self.total)


def _cfg(model_config):
    from dualrpo_mcore.models.qwen2_5_vl import QwenVLConfig, from_hf

    return model_config if isinstance(model_config, QwenVLConfig) else from_hf(model_config)


def lm_forward(cfg, seq_lens: Sequence[int], vocab: Optional[int] = None, causal: bool = False) -> ForwardFlops:
    """LM forward FLOPs for rows of the given lengths (tokens actually run through the model)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q_width, kv_width = cfg.num_heads * hd, cfg.num_kv_heads * hd
    vocab = cfg.padded_vocab_size() if vocab is None else vocab
    tokens = float(sum(int(s) for s in seq_lens))
    # Per token and layer: Q and O (h <-> heads*hd), K and V (h -> kv*hd), gate/up/down (h <-> ffn).
    per_token = 2 * (2 * h * q_width + 2 * h * kv_width + 3 * h * cfg.ffn_hidden_size)
    square = float(sum(int(s) ** 2 for s in seq_lens))
    attention = 2 * 2 * square * q_width * (0.5 if causal else 1.0)
    return ForwardFlops(lm_linear=cfg.num_layers * tokens * per_token, lm_attention=cfg.num_layers * attention,
                        lm_output=2 * tokens * h * vocab)


def vision_forward(cfg, grid_thw) -> ForwardFlops:
    """ViT + merger forward FLOPs for images with grids ``[[t, h, w], ...]`` (in patches)."""
    import torch

    from dualrpo_mcore.models.qwen2_5_vl import geometry

    grids = torch.as_tensor(grid_thw, dtype=torch.long).reshape(-1, 3)
    if grids.numel() == 0:
        return ForwardFlops()
    d, f, m = cfg.vision_hidden_size, cfg.vision_ffn_hidden_size, cfg.spatial_merge_size
    bad = [g for g in grids.tolist() if g[1] % m or g[2] % m]
    if bad:
        raise ValueError(f"image grids {bad}: height and width must be multiples of spatial_merge_size={m}")
    patches = float(grids.prod(-1).sum())
    _, windows = geometry.window_permutation(grids, m, cfg.window_size, cfg.patch_size)
    frames = geometry.segment_lengths(grids)
    full_blocks = sum(1 for i in set(cfg.fullatt_block_indexes) if 0 <= i < cfg.vision_depth)
    window_blocks = cfg.vision_depth - full_blocks
    # Scores and weighted sum over every head: 2 products of L x L x d per segment of L patches.
    score = lambda lengths: 2 * 2 * float(sum(x * x for x in lengths)) * d  # noqa: E731
    unit = cfg.merger_hidden_size
    return ForwardFlops(
        vision_patch=2 * patches * cfg.patch_dim * d,
        vision_linear=cfg.vision_depth * patches * 2 * (3 * d * d + d * d + 3 * d * f),
        vision_attention=window_blocks * score(windows) + full_blocks * score(frames),
        merger=2 * (patches / m ** 2) * (unit * unit + unit * cfg.out_hidden_size))


def forward_flops(model_config, seq_lens: Sequence[int], grid_thw=None, vocab: Optional[int] = None,
                  causal: bool = False) -> ForwardFlops:
    """Forward FLOPs of a batch: LM over rows of ``seq_lens`` tokens, ViT over ``grid_thw`` images.

    ``model_config``: a ``QwenVLConfig`` or anything ``from_hf`` reads. ``vocab``: output-layer width
    (default: the padded vocab, as Megatron computes it; transformers computes the real vocab)."""
    cfg = _cfg(model_config)
    lm = lm_forward(cfg, seq_lens, vocab, causal)
    vis = vision_forward(cfg, grid_thw) if grid_thw is not None else ForwardFlops()
    return ForwardFlops(lm.lm_linear, lm.lm_attention, lm.lm_output, vis.vision_patch, vis.vision_linear,
                        vis.vision_attention, vis.merger)


def train_flops(fwd: ForwardFlops, recompute: str = "none") -> Dict[str, float]:
    """``model`` (3 x forward: MFU) and ``hardware`` (plus recomputation: HFU) FLOPs of one step."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: choose one of {RECOMPUTE}")
    model = 3 * fwd.total
    extra = {"none": 0.0, "selective": fwd.lm_attention, "full": fwd.lm}[recompute]
    return dict(model=model, hardware=model + extra)


def batch_flops(model_config, batch, vocab: Optional[int] = None, recompute: str = "none") -> Dict[str, float]:
    """Step FLOPs of a padded batch dict (``attention_mask`` [B, S], optional ``image_grid_thw``),
    counting each row's real tokens only: padding is waste, not useful work."""
    lens = batch["attention_mask"].sum(-1).tolist()
    fwd = forward_flops(model_config, lens, batch.get("image_grid_thw"), vocab)
    out = train_flops(fwd, recompute)
    out.update({f"forward_{k}": v for k, v in fwd.as_dict().items()})
    return out
