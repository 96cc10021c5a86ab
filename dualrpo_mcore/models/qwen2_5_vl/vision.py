"""Qwen2.5-VL vision encoder and patch merger, built from Megatron-Core parts.

Layers are Megatron ``TransformerLayer``s built from a ModuleSpec (TE or local), so tensor
parallelism comes from Megatron's column/row-parallel linears. What Megatron does not have is
assembled here: the 3D patch embedding, the 2D (row, col) rotary embedding, and the window
attention (windows of merged units, full attention at ``fullatt_block_indexes``) over the
window-permuted patch sequence. How each layer attends, per spec: docs/design.md §5, "Attention never
crosses rows". On the local spec the dense block-diagonal mask over all patches of a micro-batch cost ~20%
of the ``small`` CPU step (four 16x16 images: 1024^2 scores per head where the windows need 16 x 64^2).

Megatron's TransformerBlock is what opens the FP8 autocast region for the LM; these layers run
outside one, so the ViT and the merger open it themselves (``precision.fp8_context``: a no-op unless
their TransformerConfig has ``fp8`` set, i.e. ``fp8_vision``). FP8 also needs the patch count padded
(``token_multiple``): the padding is one extra attention segment no real patch sees, cut off after
the merger.
"""
from __future__ import annotations

import copy
import functools
from typing import Tuple

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from . import geometry
from .config import QwenVLConfig
from .precision import fp8_context
from .specs import merger_linears, norm_module, vision_layer_spec


def tp_group():
    """This rank's tensor-parallel group; None before Megatron's parallel state exists (then Megatron
    itself passes None through)."""
    return parallel_state.get_tensor_model_parallel_group(check_initialized=False)


def with_ffn_hidden_size(spec, ffn_hidden_size: int):
    """A copy of a TransformerLayer spec whose MLP is built with an explicit ``ffn_hidden_size``.

    Megatron's TransformerLayer builds the MLP from the spec's params and does not pass the width
    itself, so without this every layer warns that the MLP "requires ffn_hidden_size" (0.16 to 0.19).
    """
    spec = copy.deepcopy(spec)
    mlp = spec.submodules.mlp
    if isinstance(mlp, functools.partial):  # 0.19: MLP.as_mlp_submodule bound to its submodules
        spec.submodules.mlp = functools.partial(mlp, ffn_hidden_size=ffn_hidden_size)
    elif hasattr(mlp, "params"):  # 0.16: a ModuleSpec, whose params reach MLP.__init__
        mlp.params = dict(mlp.params or {}, ffn_hidden_size=ffn_hidden_size)
    return spec


class PatchEmbed(torch.nn.Module):
    """Conv3d with kernel == stride over one (C, T, P, P) patch, i.e. a linear map of the
    flattened patch; kept as a conv weight so it maps 1:1 onto the HF tensor. Replicated over TP
    (it is tiny and its output feeds every rank)."""

    def __init__(self, cfg: QwenVLConfig, dtype: torch.dtype):
        super().__init__()
        self.proj = torch.nn.Module()
        shape = (cfg.vision_hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj.weight = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
        torch.nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixels.to(w.dtype).reshape(-1, w[0].numel()), w.reshape(w.shape[0], -1))


class PatchMerger(MegatronModule):
    """RMSNorm per patch, concatenate each merge x merge block, 2-layer GELU MLP to the LM width."""

    def __init__(self, cfg: QwenVLConfig, merger_config, vision_config, backend: str):
        super().__init__(config=merger_config)
        self.unit = cfg.merger_hidden_size
        self.ln_q = build_module(norm_module(backend), config=vision_config,
                                 hidden_size=cfg.vision_hidden_size, eps=vision_config.layernorm_epsilon)
        fc1, fc2 = merger_linears(backend)
        # ffn_hidden_size and tp_group given, not defaulted: megatron-core 0.16 to 0.19 warn that both
        # will be required (and accept both).
        self.mlp = MLP(merger_config, MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2), input_size=self.unit,
                       ffn_hidden_size=merger_config.ffn_hidden_size, tp_group=tp_group())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x).reshape(-1, 1, self.unit)  # [N/merge^2, 1, unit]: MLP expects [s, b, h]
        with fp8_context(self.config):
            out, bias = self.mlp(x)
        if bias is not None:
            out = out + bias
        return out.squeeze(1)


class VisionRotary(torch.nn.Module):
    """2D rotary: the first half of the rotated dims follow the patch row, the second the column."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        quarter = head_dim // 2
        self.register_buffer(
            "inv_freq", 1.0 / theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter),
            persistent=False)

    def forward(self, rc: torch.Tensor) -> torch.Tensor:
        """rc [N, 2] -> Megatron rotary tensor [N, 1, 1, head_dim] (cos/sin taken downstream)."""
        freqs = rc.to(self.inv_freq.device, torch.float)[..., None] * self.inv_freq  # [N, 2, d/4]
        freqs = freqs.reshape(rc.shape[0], -1)  # [N, d/2]: rows then cols
        return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]


class _LayerList(torch.nn.ModuleList):
    """The ViT layers. A plain ModuleList has no ``sharded_state_dict``, so Megatron's default would
    checkpoint its tensors as replicated across TP and every rank would load rank 0's shard; each
    layer knows how its own tensors are split. Parameter names stay ``layers.{i}.*``."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        out = {}
        for i, layer in enumerate(self):
            out.update(layer.sharded_state_dict(f"{prefix}{i}.", sharded_offsets, metadata))
        return out


@functools.lru_cache(maxsize=32)
def _grid_geometry(grids: Tuple[Tuple[int, int, int], ...], merge: int, window: int, patch: int):
    """(window order, window lengths, full-attention lengths, patch (row, col)) of images with these grids:
    a function of the grids alone, which every forward over the same images (a step's old-policy,
    reference and update passes) recomputed in Python (~4% of a tiny CPU step). The tensors are only read."""
    g = torch.tensor(grids, dtype=torch.long).view(-1, 3)
    order, win_lengths = geometry.window_permutation(g, merge, window, patch)
    return order, win_lengths, geometry.segment_lengths(g), geometry.vision_patch_positions(g, merge)


class VisionModel(MegatronModule):
    """Patch embedding -> windowed ViT layers -> merger; returns merged embeddings in image order."""

    def __init__(self, cfg: QwenVLConfig, vision_config, merger_config, backend: str = "local",
                 token_multiple: int = 1):
        super().__init__(config=vision_config)
        self.cfg = cfg
        # The merger takes merge^2 patches per row: this makes both its rows and the ViT's a multiple.
        self.patch_multiple = token_multiple * cfg.spatial_merge_size ** 2
        self.patch_embed = PatchEmbed(cfg, vision_config.params_dtype)
        self.rotary = VisionRotary(cfg.vision_head_dim, cfg.vision_rope_theta)
        spec = with_ffn_hidden_size(vision_layer_spec(backend), vision_config.ffn_hidden_size)
        self.layers = _LayerList(
            build_module(spec, config=vision_config, layer_number=i + 1) for i in range(cfg.vision_depth))
        self.merger = PatchMerger(cfg, merger_config, vision_config, backend)
        self.full_attention = set(cfg.fullatt_block_indexes)
        self.segmented = backend == "local" and vision_config.context_parallel_size == 1

    def _plan(self, grid_thw: torch.Tensor, device, pad: int = 0) -> Tuple[torch.Tensor, dict, dict, torch.Tensor]:
        """Window order of merged units, the layer arguments of the full and the window layers over the
        permuted sequence (THD segments on the local spec, block-diagonal masks otherwise; ``pad`` trailing
        padding patches form a segment of their own in both), and each patch's (row, col)."""
        c = self.cfg
        order, win_lengths, full, rc = _grid_geometry(tuple(map(tuple, grid_thw.tolist())), c.spatial_merge_size,
                                                      c.window_size, c.patch_size)
        tail = [pad] if pad else []
        full, window = full + tail, win_lengths + tail
        if self.segmented:
            from .packing import segments_params

            args = [dict(attention_mask=None, packed_seq_params=segments_params(n, device)) for n in (full, window)]
        else:
            args = [dict(attention_mask=geometry.block_diagonal_mask(n, device)) for n in (full, window)]
        return order.to(device), args[0], args[1], rc.to(device)

    def _permute(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        unit = self.cfg.spatial_merge_size ** 2
        return x.reshape(-1, unit, *x.shape[1:])[order].reshape(x.shape)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C*T*P*P] (the HF processor's layout), grid_thw [I, 3] -> [N/merge^2, H_lm]."""
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        pad = -n % self.patch_multiple
        order, full_args, window_args, rc = self._plan(grid_thw, x.device, pad)
        x = F.pad(self._permute(x, order), (0, 0, 0, pad))[:, None, :]  # [N + pad, 1, H]: Megatron's [s, b, h]
        rotary = F.pad(self._permute(self.rotary(rc), order), (0, 0, 0, 0, 0, 0, 0, pad))  # angle 0 on padding
        with fp8_context(self.config):
            for i, layer in enumerate(self.layers):
                x, _ = layer(hidden_states=x, rotary_pos_emb=rotary,
                             **(full_args if i in self.full_attention else window_args))
        merged = self.merger(x[:, 0])[: n // self.cfg.spatial_merge_size ** 2]
        return merged[torch.argsort(order)]
