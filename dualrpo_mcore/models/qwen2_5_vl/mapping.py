"""The one HF <-> Megatron weight mapping for Qwen2.5-VL (conversion and rollout weight sync).

Every Megatron parameter is described by a :class:`Rule`: its canonical Megatron name (the
Transformer-Engine style name that dist_checkpointing also uses), the HF tensor(s) it is made of,
how they are fused into one *global* (TP-independent) tensor, and how that global tensor is split
over tensor-parallel ranks. Global layouts:

* ``qkv``: Megatron's fused QKV, grouped per KV head: for each query group
  ``[q heads of the group, k, v]`` (rows), bias likewise. A TP shard is a contiguous run of groups.
* ``glu``: SwiGLU ``linear_fc1 = [gate; up]``; a TP shard is ``[gate_r; up_r]`` (not contiguous).
* ``vocab``: embedding / output rows padded with zeros to the padded vocab size.

HF names use the layout checkpoints are published and saved in (``model.layers.*``, ``visual.*``,
``lm_head``); transformers-5 in-memory names (``model.language_model.*``, ``model.visual.*``) are
accepted on input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .config import QwenVLConfig


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: Tuple[str, ...]
    fuse: str = "copy"   # copy | qkv | vision_qkv | glu | vocab
    split: str = "none"  # none | col | row | glu
    lm_layer: Optional[int] = None  # global LM layer index (decides the pipeline stage)
    stage: str = "first"  # first | last | layer (which pipeline stage owns it)


def _lm_layer_rules(i: int) -> List[Rule]:
    m, h = f"language_model.decoder.layers.{i}.", f"model.layers.{i}."
    qkv = tuple(f"{h}self_attn.{p}_proj" for p in "qkv")
    return [
        Rule(m + "self_attention.linear_qkv.layer_norm_weight", (h + "input_layernorm.weight",)),
        Rule(m + "self_attention.linear_qkv.weight", tuple(p + ".weight" for p in qkv), "qkv", "col"),
        Rule(m + "self_attention.linear_qkv.bias", tuple(p + ".bias" for p in qkv), "qkv", "col"),
        Rule(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), split="row"),
        Rule(m + "mlp.linear_fc1.layer_norm_weight", (h + "post_attention_layernorm.weight",)),
        Rule(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
             "glu", "glu"),
        Rule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), split="row"),
    ]


def _vision_layer_rules(i: int) -> List[Rule]:
    m, h = f"vision.layers.{i}.", f"visual.blocks.{i}."
    rules = [
        Rule(m + "self_attention.linear_qkv.layer_norm_weight", (h + "norm1.weight",)),
        Rule(m + "mlp.linear_fc1.layer_norm_weight", (h + "norm2.weight",)),
    ]
    for suffix in ("weight", "bias"):
        rules += [
            Rule(m + f"self_attention.linear_qkv.{suffix}", (h + f"attn.qkv.{suffix}",), "vision_qkv", "col"),
            Rule(m + f"self_attention.linear_proj.{suffix}", (h + f"attn.proj.{suffix}",),
                 split="row" if suffix == "weight" else "none"),
            Rule(m + f"mlp.linear_fc1.{suffix}",
                 (h + f"mlp.gate_proj.{suffix}", h + f"mlp.up_proj.{suffix}"), "glu", "glu"),
            Rule(m + f"mlp.linear_fc2.{suffix}", (h + f"mlp.down_proj.{suffix}",),
                 split="row" if suffix == "weight" else "none"),
        ]
    return rules


def rules(cfg: QwenVLConfig, pp: int = 1) -> List[Rule]:
    """All rules, in a stable order (vision, embedding, layers, head).

    With tied embeddings and pp > 1 Megatron keeps a copy of the embedding as the last stage's
    output layer (kept equal by the embedding group), so that copy gets a rule of its own.
    """
    out = [Rule("vision.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",))]
    for i in range(cfg.vision_depth):
        out += _vision_layer_rules(i)
    out += [
        Rule("vision.merger.ln_q.weight", ("visual.merger.ln_q.weight",)),
        Rule("vision.merger.mlp.linear_fc1.weight", ("visual.merger.mlp.0.weight",), split="col"),
        Rule("vision.merger.mlp.linear_fc1.bias", ("visual.merger.mlp.0.bias",), split="col"),
        Rule("vision.merger.mlp.linear_fc2.weight", ("visual.merger.mlp.2.weight",), split="row"),
        Rule("vision.merger.mlp.linear_fc2.bias", ("visual.merger.mlp.2.bias",)),
        Rule("language_model.embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
             "vocab", "col"),
    ]
    for i in range(cfg.num_layers):
        out += [Rule(r.mcore, r.hf, r.fuse, r.split, lm_layer=i, stage="layer") for r in _lm_layer_rules(i)]
    out.append(Rule("language_model.decoder.final_layernorm.weight", ("model.norm.weight",), stage="last"))
    if not cfg.tie_word_embeddings or pp > 1:
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        out.append(Rule("language_model.output_layer.weight", (head,), "vocab", "col", stage="last"))
    return out


# ---------------------------------------------------------------- HF names

_V5_TO_HF = [(re.compile(r"^model\.language_model\."), "model."),
             (re.compile(r"^model\.visual\."), "visual.")]


def normalize_hf_name(name: str) -> str:
    """transformers-5 in-memory names -> published checkpoint names."""
    for pat, rep in _V5_TO_HF:
        if pat.match(name):
            return pat.sub(rep, name, count=1)
    return name


# ---------------------------------------------------------------- fuse / unfuse (global tensors)

def _qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    d = q.shape[0] // heads
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_unfuse(t: torch.Tensor, heads: int, groups: int) -> List[torch.Tensor]:
    per = heads // groups
    d = t.shape[0] // (heads + 2 * groups)
    rest = t.shape[1:]
    g = t.reshape(groups, (per + 2) * d, *rest)
    q, k, v = torch.split(g, [per * d, d, d], dim=1)
    return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]


class Converter:
    """Fuses HF tensors into Megatron global tensors and back, per rule."""

    def __init__(self, cfg: QwenVLConfig, padded_vocab: Optional[int] = None):
        self.cfg = cfg
        self.padded_vocab = padded_vocab or cfg.padded_vocab_size()

    def _heads(self, rule: Rule) -> Tuple[int, int]:
        if rule.fuse == "vision_qkv":
            return self.cfg.vision_heads, self.cfg.vision_heads
        return self.cfg.num_heads, self.cfg.num_kv_heads

    def to_mcore(self, rule: Rule, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if rule.fuse == "copy":
            return tensors[0]
        if rule.fuse == "qkv":
            return _qkv_fuse(*tensors, *self._heads(rule))
        if rule.fuse == "vision_qkv":
            # HF packs [q; k; v] (each all heads); Megatron interleaves per head.
            q, k, v = torch.chunk(tensors[0], 3, dim=0)
            return _qkv_fuse(q, k, v, *self._heads(rule))
        if rule.fuse == "glu":
            return torch.cat(list(tensors), dim=0)
        if rule.fuse == "vocab":
            t = tensors[0]
            pad = self.padded_vocab - t.shape[0]
            return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad > 0 else t
        raise ValueError(f"unknown fuse kind {rule.fuse!r}")

    def to_hf(self, rule: Rule, t: torch.Tensor) -> List[torch.Tensor]:
        if rule.fuse == "copy":
            return [t]
        if rule.fuse == "qkv":
            return _qkv_unfuse(t, *self._heads(rule))
        if rule.fuse == "vision_qkv":
            return [torch.cat(_qkv_unfuse(t, *self._heads(rule)), dim=0)]
        if rule.fuse == "glu":
            return [x.contiguous() for x in torch.chunk(t, 2, dim=0)]
        if rule.fuse == "vocab":
            return [t[: self.cfg.vocab_size].contiguous()]
        raise ValueError(f"unknown fuse kind {rule.fuse!r}")


# ---------------------------------------------------------------- tensor-parallel split / merge

def tp_shard(t: torch.Tensor, split: str, rank: int, size: int) -> torch.Tensor:
    """This TP rank's piece of a global Megatron tensor."""
    if split == "none" or size == 1:
        return t
    if split == "col":
        return torch.chunk(t, size, dim=0)[rank].contiguous()
    if split == "row":
        return torch.chunk(t, size, dim=1)[rank].contiguous()
    if split == "glu":
        gate, up = torch.chunk(t, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]]).contiguous()
    raise ValueError(f"unknown split {split!r}")


def tp_merge(shards: Sequence[torch.Tensor], split: str) -> torch.Tensor:
    """Inverse of :func:`tp_shard` over all ranks' pieces."""
    if split == "none" or len(shards) == 1:
        return shards[0]
    if split == "col":
        return torch.cat(list(shards), dim=0)
    if split == "row":
        return torch.cat(list(shards), dim=1)
    if split == "glu":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown split {split!r}")


# ---------------------------------------------------------------- pipeline stages and local names

def layers_per_stage(cfg: QwenVLConfig, pp: int) -> int:
    if cfg.num_layers % pp:
        raise ValueError(f"num_hidden_layers={cfg.num_layers} is not divisible by pipeline size {pp}")
    return cfg.num_layers // pp


def owner_stage(rule: Rule, cfg: QwenVLConfig, pp: int) -> int:
    if rule.stage == "first":
        return 0
    if rule.stage == "last":
        return pp - 1
    return rule.lm_layer // layers_per_stage(cfg, pp)


def local_name(rule: Rule, cfg: QwenVLConfig, pp: int) -> str:
    """Name in the module of the owning stage (layer index made stage-local)."""
    if rule.lm_layer is None:
        return rule.mcore
    local = rule.lm_layer - owner_stage(rule, cfg, pp) * layers_per_stage(cfg, pp)
    return rule.mcore.replace(f"decoder.layers.{rule.lm_layer}.", f"decoder.layers.{local}.", 1)


# The local (non-TE) spec keeps norms as separate modules; TE fuses them into the next linear.
_LOCAL_TO_TE = [("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"),
                ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")]


def from_canonical(name: str, te_spec: bool) -> str:
    if te_spec:
        return name
    for local, te in _LOCAL_TO_TE:
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def shard_for_rank(cfg: QwenVLConfig, get_hf: Callable[[str], torch.Tensor], tp_rank: int, tp: int,
                   pp_rank: int, pp: int, te_spec: bool = False,
                   converter: Optional[Converter] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(module state_dict name, tensor)`` for one (tp, pp) rank, reading HF tensors lazily."""
    conv = converter or Converter(cfg)
    for rule in rules(cfg, pp):
        if owner_stage(rule, cfg, pp) != pp_rank:
            continue
        glob = conv.to_mcore(rule, [get_hf(n) for n in rule.hf])
        yield from_canonical(local_name(rule, cfg, pp), te_spec), tp_shard(glob, rule.split, tp_rank, tp)


def hf_state_dict_to_rank(cfg: QwenVLConfig, hf_sd: Dict[str, torch.Tensor], tp_rank: int = 0, tp: int = 1,
                          pp_rank: int = 0, pp: int = 1, te_spec: bool = False) -> Dict[str, torch.Tensor]:
    """A whole in-memory HF state dict -> one rank's Megatron state dict (used by tests, weight sync)."""
    named = {normalize_hf_name(k): v for k, v in hf_sd.items()}
    return dict(shard_for_rank(cfg, named.__getitem__, tp_rank, tp, pp_rank, pp, te_spec))
