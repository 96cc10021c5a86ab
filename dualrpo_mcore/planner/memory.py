"""Per-GPU memory model of a DualRPO run: Megatron-Core actor + colocated SGLang rollout engine.

Pure functions over a :class:`~dualrpo_mcore.models.qwen2_5_vl.config.QwenVLConfig` and a few
dataclasses; ``dualrpo plan`` (:mod:`.plan`) turns a recipe into these inputs and prints the result.
Every term below follows what the code in this repository and Megatron-Core 0.16.1 allocate:

**Parameters** (per TP/PP rank, exact counts): the ViT (patch embedding, 32 blocks) and the merger
live whole on the first pipeline stage (``QwenVLModel`` builds them only when ``pre_process``); LM
layers split evenly over PP; the word embedding (first stage) and output layer (last stage) have
``padded_vocab_size(max(128, tp))`` rows split over TP. With tied embeddings the output layer shares
the embedding when PP = 1, but Megatron allocates its own copy on the last stage when PP > 1. Column
-parallel weights/biases are divided by TP; row-parallel biases, norms and the patch embedding are
replicated on every TP rank.

**Gradients**: Megatron DDP keeps one contiguous gradient buffer per (param dtype, grad dtype); our
``wrap_and_optimizer`` sets ``grad_reduce_in_fp32=True``, so every trainable element costs 4 bytes,
unsharded (the reduce-scatter of the distributed optimizer writes into the same full buffer). With the
distributed optimizer the buffer is padded to a multiple of lcm(DP, 128) (and each parameter starts on
a 64-element boundary: negligible) (``param_and_grad_buffer.py``); with ``overlap_grad_reduce=False`` there is
one bucket per buffer. Frozen parts (``actor.model.training``) have no gradient.

**Optimizer**: Adam. bf16/fp16 params: fp32 main copy + exp_avg + exp_avg_sq = 12 bytes per trainable
element; fp32 params: the optimizer updates the params themselves (Megatron's FP32Optimizer, or the
distributed optimizer's fp32 shard is a view of the param buffer), so only the two moments, 8 bytes.
The distributed optimizer keeps these for its 1/DP shard of the (padded) buffer. With the distributed
optimizer and 16-bit params Megatron also remaps params into a param buffer: that replaces, not adds
to, the parameter storage.

**Activations** (what autograd saves in one forward, per micro-batch in flight; counted per token,
TP-local, no sequence parallelism as in ``config._common``). Local spec (the CPU path, measured by
``tests/distributed/test_plan_measured.py``), per LM layer: each RMSNorm + following linear saves the
norm input and x*rstd (for the weight grad) in fp32 (torch's RMSNorm upcasts), the linear input and
rstd; unfused rotary (``apply_rope_fusion=False``) saves cos/sin per q and k (4*head_dim); the core
attention (``PackedDotProductAttention``: SDPA, whose CPU flash kernel keeps no [heads, s, s] score
matrix) saves q, k, v as the kernel sees them (the rotated q; with GQA k and v repeated to all heads,
new tensors, else the rotated k and v, a view of the fused qkv output), its output (linear_proj's
input is a view of it) and an fp32 log-sum-exp per head; the gated MLP saves fc1's output (2*ffn) and
three ffn-wide tensors (the gate's activation input and output, and fc2's input). The causal padding
mask is saved once per stage as SDPA's additive float mask [rows, 1, s, s] in the activation dtype
(built once per forward, shared by the layers). 'selective' recompute re-runs the core attention: the
checkpoint keeps its inputs (the fused qkv storage, v is a view of it, and rotated q/k), its output and
the bool mask; the re-run's repeated k/v, output and log-sum-exp are a backward transient. 'full'
recompute keeps each layer's input (h), one shared rotary table and the bool mask; in backward one
layer is re-run at a time (its activations are a transient on top, reported separately). Transformer
Engine spec (GPU): a LayerNormLinear saves input, normalised output and rstd (2h+1), attention is fused
(q, k, v at their own widths, output and an fp32 log-sum-exp per head), the MLP keeps fc1's output and
fc2's input, the causal mask is [rows, 1, s, s] bool. The ViT is never recomputed and saves nothing
when frozen. On the local spec each window (window layers) or image (full-attention layers) is one
sequence of the packed path below (its two RowLayouts, windows and images, are shared by the layers),
sized as if the windows filled their length buckets (exact when an image's grid is a multiple of the
window; edge windows otherwise pad to their bucket's longest); its forward builds no score matrix. The
TE spec's ViT attends over all patches of a micro-batch under a block-diagonal ``arbitrary`` mask,
which TE runs unfused: [heads, N, N] fp32 softmax saved (plus its 16-bit cast), and one layer's scores
alive during its forward even when frozen. The 'transient working set' is the larger of that forward
transient and the backward one (the re-run layer or core under recompute plus the logits' gradient).
The 1F1B pipeline schedule holds min(PP - stage, micro-batches) micro-batches on a stage.

**Log-prob buffers** (last stage): GPTModel returns the logits [rows, s, V/TP] made contiguous (held by
the schedule until backward) and ``Actor._stats`` slices off the last column, which copies when rows >
1; ``ops.token_stats`` saves that copy (plus 3 fp32 per token). Backward materialises a gradient of
the same size (transient). With ``Layout.fused_head`` (``actor.model.fused_head``) no logits exist
outside ``ops.fused_head``: held are the shifted hidden-state copy and the op's copy of the response
rows ([tokens, H] each, an upper bound) plus the 3 fp32 stats and labels; the transient is one chunk
(the op's byte budget, or less for a small micro-batch) and, for a 16-bit weight, the fp32 buffer
the weight gradient is summed in when there are several chunks ([V/TP, H]).

**Packed micro-batches** (``MicroBatch.packed``, ``actor.model.packing``): the rows run as one stream of
their T real tokens instead of ``rows x seq_len`` positions, so every per-token term above counts T. The
local spec's attention groups the sequences into length buckets (same quarter-octave ceiling) and gathers
each bucket into padded rows of its longest: q, k, v (k, v after the GQA repeat), the output and the
log-sum-exp are saved at those padded positions (``MicroBatch.attended``, for the plan's micro-batch of
one ``seq_len`` row and equal shorter ones), and the real tokens' output gathered back into stream
order at T; no mask, but the stream's ``RowLayout`` (int64 index and take and bool validity per padded
position, int64 slot per token), once per stage. TE's THD attention takes ``cu_seqlens`` and has none of these.
The shifted logits (or hidden rows) of the one-row stream are a view, not a copy. The ViT is unchanged
(the images are the padded batch's).

**Reference model**: with ``actor.kl.beta0 > 0`` a full copy of the stage's params; on the GPU during
the update unless ``offload_reference`` (then only during its own forward, when no activations are
kept).

**Colocated SGLang**: with ``mem_fraction_static`` f, SGLang sizes its weights (bf16, split over its
TP) + KV pool at start-up from the memory it finds free: ``profile_max_num_token`` computes
``rest = free_after_load - free_before_load * (1 - f)``, i.e. pool = f x F0 - weights, where F0 is the
free memory when the engine starts (the whole GPU if nothing else holds memory: then pool = f x GPU -
weights). ``trainer.context.setup`` builds the Actor before the engine, so F0 = GPU - (params + gradient
buffers + fp32 main params + context); Adam's moments appear at the first step, after. SGLang gives
weights and KV back before training (``SGLangEngine.release_memory``); the actor's params, gradient
buffers and optimizer state stay on the GPU during rollout (nothing offloads them in this code). So
peak = max(training phase, rollout phase), each with a fixed CUDA context/allocator overhead. KV
capacity in tokens = pool / (2 * layers * max(1, kv_heads/tp) * head_dim * 2 bytes). Planned for the
GPUs that host SGLang (the engine is built on rank 0 and spans ``tp_size`` GPUs), and every stage is
shown as if it hosted one (conservative); a pool <= 0 means SGLang refuses to start, which the plan
reports as not fitting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from dualrpo_mcore.models.qwen2_5_vl.config import RECOMPUTE
from dualrpo_mcore.models.qwen2_5_vl.specs import RESOLVED_BACKENDS

GIB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BACKENDS = RESOLVED_BACKENDS  # a plan sizes the modules a run builds: never 'auto'


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Layout:
    """How the actor is parallelised and stored."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    dtype: str = "bf16"
    recompute: str = "none"
    distributed_optimizer: bool = True
    backend: str = "te"
    """'local' (Megatron's local spec, unfused attention: the CPU path) or 'te' (Transformer Engine)."""
    freeze_vision: bool = False
    freeze_merger: bool = False
    freeze_language: bool = False
    fused_head: bool = False
    """The actor's ``model.fused_head`` (its default is on): the logits are never stored (see the
    module doc). False models the output layer + ``ops.token_stats``, the larger of the two."""

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.dp) < 1:
            raise ValueError(f"tp, pp, dp must be >= 1 (got {self.tp}, {self.pp}, {self.dp})")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {sorted(DTYPE_BYTES)}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r}: choose one of {RECOMPUTE}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: choose one of {BACKENDS}")


@dataclass(frozen=True)
class MicroBatch:
    """The shape of one micro-batch: ``rows`` rows, the longest ``seq_len`` tokens, together
    ``real_tokens`` real tokens (None: every row ``seq_len`` long), each row holding ``patches_per_row``
    ViT patches (images). Padded it runs as ``[rows, seq_len]``; ``packed`` (``actor.model.packing``) as
    one stream of its real tokens, attention kept within each row."""

    rows: int
    seq_len: int
    patches_per_row: int = 0
    packed: bool = False
    real_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if self.rows < 1 or self.seq_len < 1:
            raise ValueError(f"a micro-batch needs rows and seq_len >= 1 (got {self.rows}, {self.seq_len})")
        real = self.real_tokens
        if real is not None and not max(self.seq_len, self.rows) <= real <= self.rows * self.seq_len:
            raise ValueError(f"real_tokens={real}: {self.rows} rows, the longest {self.seq_len} tokens, hold "
                             f"{max(self.seq_len, self.rows)} to {self.rows * self.seq_len}")

    @property
    def tokens(self) -> int:
        """Positions every layer runs: ``rows x seq_len`` padded, the stream's T (its real tokens) packed."""
        if self.packed and self.real_tokens is not None:
            return self.real_tokens
        return self.rows * self.seq_len

    @property
    def attended(self) -> int:
        """Positions the local spec's attention runs: ``rows x seq_len`` padded; packed, its length buckets'
        padded rows (``packed_attention.length_buckets``) for one ``seq_len`` row and the rest split evenly."""
        if not self.packed or self.real_tokens is None:
            return self.rows * self.seq_len
        from dualrpo_mcore.models.qwen2_5_vl.packed_attention import length_buckets

        rest, short = divmod(self.real_tokens - self.seq_len, max(1, self.rows - 1))
        lengths = [self.seq_len] + [rest + (i < short) for i in range(self.rows - 1) if rest + (i < short)]
        return sum(len(b) * max(lengths[i] for i in b) for b in length_buckets(lengths))


@dataclass(frozen=True)
class Colocation:
    """The rollout side and the GPU."""

    gpu_bytes: int = 80 * 10 ** 9
    mem_fraction: float = 0.0
    """SGLang's ``mem_fraction_static``; 0 = no colocated engine (e.g. the HF engine on CPU)."""
    sglang_tp: int = 1
    rollout_tokens: int = 0
    """Tokens the step's rollouts occupy at once: prompts x group x (prompt + max_new_tokens)."""
    sglang_instances: int = 1
    overhead_bytes: int = 2 * GIB
    """CUDA context, NCCL buffers and allocator slack per GPU (not measured here)."""
    reference: str = "none"
    """'none' (beta0 = 0), 'gpu' (kept on the GPU) or 'offload' (on the GPU only for its forward)."""


# ---------------------------------------------------------------------------------------------- parameters
def lm_layer_params(cfg, tp: int) -> int:
    """One Qwen2 decoder layer on one TP rank: qkv (+bias, column), proj (row, no bias), gated MLP, 2 norms."""
    h, hd = cfg.hidden_size, cfg.head_dim
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    return (h * qkv + qkv) // tp + (cfg.num_heads * hd * h) // tp \
        + (2 * cfg.ffn_hidden_size * h + cfg.ffn_hidden_size * h) // tp + 2 * h


def vision_layer_params(cfg, tp: int) -> int:
    """One ViT block: as the LM layer but with biases on every linear (row-parallel biases replicated)."""
    h, f = cfg.vision_hidden_size, cfg.vision_ffn_hidden_size
    return (3 * h * h + 3 * h) // tp + h * h // tp + h + (2 * f * h + 2 * f) // tp + f * h // tp + h + 2 * h


def merger_params(cfg, tp: int) -> int:
    """ln_q (replicated) + fc1 (column, bias) + fc2 (row, replicated bias) of the patch merger."""
    u, out = cfg.merger_hidden_size, cfg.out_hidden_size
    return cfg.vision_hidden_size + (u * u + u) // tp + u * out // tp + out


def padded_vocab(cfg, tp: int) -> int:
    """As ``QwenVLModel``: rows padded to a multiple of max(128, tp)."""
    return cfg.padded_vocab_size(max(128, tp))


def stage_params(cfg, tp: int, pp: int, stage: int) -> Dict[str, int]:
    """Parameter elements of one (TP rank, PP stage), by part (``vision``, ``merger``, ``language``)."""
    layers = cfg.num_layers // pp
    first, last = stage == 0, stage == pp - 1
    rows = padded_vocab(cfg, tp) // tp
    lang = layers * lm_layer_params(cfg, tp)
    if first:
        lang += rows * cfg.hidden_size
    if last:
        lang += cfg.hidden_size  # final norm
        # Tied embeddings share the first stage's tensor only when both live on the same rank.
        if not cfg.tie_word_embeddings or pp > 1:
            lang += rows * cfg.hidden_size
    out = {"language": lang, "vision": 0, "merger": 0}
    if first:
        out["vision"] = cfg.vision_hidden_size * cfg.patch_dim + cfg.vision_depth * vision_layer_params(cfg, tp)
        out["merger"] = merger_params(cfg, tp)
    return out


def trainable_params(counts: Dict[str, int], layout: Layout) -> int:
    frozen = {"vision": layout.freeze_vision, "merger": layout.freeze_merger, "language": layout.freeze_language}
    return sum(n for part, n in counts.items() if part in frozen and not frozen[part])


def total_params(counts: Dict[str, int]) -> int:
    return counts["language"] + counts["vision"] + counts["merger"]


# ---------------------------------------------------------------------------------------------- grads, optimizer
def grad_buffer_elems(trainable: int, layout: Layout) -> int:
    """Elements of Megatron DDP's gradient buffer (one bucket, ``overlap_grad_reduce=False``)."""
    if not layout.distributed_optimizer or trainable == 0:
        return trainable
    # The bucket ends on a multiple of lcm(DP, 128). Params also start 64-aligned, which costs at most 63
    # elements per tensor whose size is not a multiple of 64 (a few in the ViT): ignored, < 0.01%.
    div = math.lcm(layout.dp, 128)
    return -(-trainable // div) * div


def grad_bytes(trainable: int, layout: Layout) -> int:
    return 4 * grad_buffer_elems(trainable, layout)  # grad_reduce_in_fp32=True


def optimizer_bytes(trainable: int, layout: Layout) -> int:
    per_elem = 8 if layout.dtype == "fp32" else 12
    if layout.distributed_optimizer:
        # Each rank owns a contiguous 1/DP of the padded buffer; state exists only for the real
        # parameter elements in it (padding has none), about trainable / DP on every rank.
        return per_elem * min(trainable, -(-trainable // layout.dp))
    return per_elem * trainable


# ---------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class _Attn:
    """One transformer block's shape on one TP rank."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    tp: int

    @property
    def q(self) -> int:  # q width on this rank
        return self.heads // self.tp * self.head_dim

    @property
    def kv(self) -> int:  # one of k, v on this rank
        return self.kv_heads // self.tp * self.head_dim

    @property
    def qkv(self) -> int:
        return self.q + 2 * self.kv

    @property
    def kv_saved(self) -> int:  # k and v as the core saves them: GQA repeats them to every head (new tensors)
        return 2 * self.q if self.heads > self.kv_heads else self.kv + self.qkv


def _norm_linear(hidden: int, backend: str, dbytes: int) -> int:
    """Bytes per token an RMSNorm and the linear after it save. torch's RMSNorm (local spec) computes
    in fp32: its fp32 input copy and x*rstd, then the linear's input in the activation dtype; TE's
    LayerNormLinear keeps input and normalised output in the activation dtype. Plus rstd (fp32)."""
    if backend == "local":
        return (8 + dbytes) * hidden + 4
    return 2 * hidden * dbytes + 4


def _sdpa_core(a: _Attn, d: int, tokens: int, attended: Optional[int]) -> int:
    """Bytes the local spec's SDPA core saves over ``tokens`` tokens: q, k, v, output, fp32 log-sum-exp per
    head; packed (``attended`` padded positions), gathered there plus the output back in stream order."""
    lse = 4 * (a.heads // a.tp)
    if attended is None:
        return tokens * ((a.q + a.kv_saved + a.q) * d + lse)
    return attended * (4 * a.q * d + lse) + tokens * a.q * d


def _block_bytes(a: _Attn, backend: str, recompute: str, d: int, tokens: int, attended: Optional[int] = None,
                 scores: int = 0) -> int:
    """Bytes one block saves over ``tokens`` tokens (module docstring). ``attended``: see ``_sdpa_core``;
    ``scores`` > 0: an unfused attention with that many query-key pairs per head (the TE spec's ViT)."""
    norm = _norm_linear(a.hidden, backend, d)
    rope = 4 * a.head_dim * d  # cos/sin for q and for k, in the activation dtype
    rest = 2 * norm + rope + (5 if backend == "local" else 3) * (a.ffn // a.tp) * d  # norms, rotary, MLP
    if backend == "te":
        # fused attention: rotated q and k, v (a view of the qkv output), output; fp32 log-sum-exp per head
        return tokens * (rest + (a.q + a.kv + a.qkv + a.q) * d + 4 * (a.heads // a.tp))
    if recompute == "selective":
        # the checkpointed core keeps its inputs (rotated q, k; v as a view of qkv) and returns the context
        return tokens * (rest + (a.q + a.kv + a.qkv + a.q) * d)
    if scores:
        # unfused: q, k, v (GQA repeated), context, fp32 softmax [heads, s, s] plus its cast in 16 bit
        return tokens * (rest + (a.q + a.kv_saved + a.q) * d) + scores * (a.heads // a.tp) * (4 + d * (d < 4))
    return tokens * rest + _sdpa_core(a, d, tokens, attended)


def lm_block(cfg, tp: int) -> _Attn:
    return _Attn(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_hidden_size, tp)


def vision_block(cfg, tp: int) -> _Attn:
    return _Attn(cfg.vision_hidden_size, cfg.vision_heads, cfg.vision_heads, cfg.vision_head_dim,
                 cfg.vision_ffn_hidden_size, tp)


def _row_layout_bytes(positions: int, tokens: int) -> int:
    """A stream's ``RowLayout`` (shared by the layers): int64 index and take, bool valid per position; int64
    slot per token."""
    return 17 * positions + 8 * tokens


def lm_activation_bytes(cfg, layout: Layout, mb: MicroBatch, layers: int, first: bool, last: bool) -> int:
    """Bytes the language-model part of one stage saves for one micro-batch."""
    d = DTYPE_BYTES[layout.dtype]
    t, s = mb.tokens, mb.seq_len
    if layout.freeze_language:
        return 0
    sdpa = layout.backend == "local" and layout.recompute == "none"  # the local core's saves are kept
    if layout.recompute == "full":
        # each layer's input, plus the rotary table the checkpoint keeps once (fp32, head_dim per token)
        body = layers * t * cfg.hidden_size * d + t * cfg.head_dim * 4
    else:
        attended = mb.attended if mb.packed and layout.backend == "local" else None
        body = layers * _block_bytes(lm_block(cfg, layout.tp), layout.backend, layout.recompute, d, t, attended)
    if not mb.packed:
        # The causal padding mask [rows, 1, s, s], one for the stage's layers: saved as bool by TE's attention
        # and by the recompute checkpoints; the local SDPA saves its additive form (activation dtype) instead.
        extra = mb.rows * s * s * (d if sdpa else 1)
    else:
        # TE's THD attention takes cu_seqlens; the local one saves the stream's RowLayout (not when recomputed)
        extra = _row_layout_bytes(mb.attended, t) if sdpa else 0
    if first:
        extra += 8 * t  # token ids kept by the embedding
    if last:
        extra += t * _norm_linear(cfg.hidden_size, layout.backend, d)  # final norm + output layer input
    return body + extra


def vision_activation_bytes(cfg, layout: Layout, mb: MicroBatch) -> int:
    """Bytes the ViT + merger save for one micro-batch (first stage): windows and images as packed
    sequences filling their buckets (local spec), or a block-diagonal [heads, N, N] unfused attention (TE)."""
    n = mb.rows * mb.patches_per_row
    if n == 0:
        return 0
    d = DTYPE_BYTES[layout.dtype]
    vh = cfg.vision_hidden_size
    # per patch: ln_q + fc1 input (a merged unit is 4 patches wide), fc1+bias output and GELU output
    merger = 0 if layout.freeze_merger else n * (_norm_linear(vh, "local", d) + 2 * vh // layout.tp * d)
    if layout.freeze_vision:
        return merger
    # TE's ViT keeps its terms as before: local-spec norms and MLP (above TE's own) and unfused attention.
    block = vision_block(cfg, layout.tp)
    if layout.backend == "te":
        tower = cfg.vision_depth * _block_bytes(block, "local", "none", d, n, scores=n * n) + 2 * n * n  # 2 masks
    else:
        tower = cfg.vision_depth * _block_bytes(block, "local", "none", d, n, attended=n)
        tower += 2 * _row_layout_bytes(n, n)  # the windows' and the images' RowLayout
    tower += n * cfg.patch_dim * d + 4 * n  # pixels, window order and its inverse
    return tower + merger


def recompute_transient_bytes(cfg, layout: Layout, mb: MicroBatch) -> int:
    """Extra bytes while backward re-runs one layer (full) or one attention core (selective)."""
    if layout.recompute == "none" or layout.freeze_language:
        return 0
    d = DTYPE_BYTES[layout.dtype]
    a = lm_block(cfg, layout.tp)
    local, t = layout.backend == "local", mb.tokens
    attended = mb.attended if mb.packed and local else None
    if layout.recompute == "full":  # the layer's saves (the mask or RowLayout is the forward's, cached)
        return _block_bytes(a, layout.backend, "none", d, t, attended)
    if not local or attended is not None:  # TE; the packed local core saves only copies: all of them new
        return _sdpa_core(a, d, t, attended) if local else 2 * t * a.q * d
    # padded: the re-run's own output and log-sum-exp, and (GQA) k and v repeated to every head
    return t * ((a.kv_saved if a.heads > a.kv_heads else 0) + a.q) * d + 4 * t * (a.heads // a.tp)


def vision_forward_transient(cfg, layout: Layout, mb: MicroBatch) -> int:
    """TE spec: one ViT layer's score matrix and probabilities over a micro-batch's patches, alive during
    its forward whether or not the ViT trains. The local spec's SDPA builds no score matrix: none."""
    if layout.backend == "local":
        return 0
    n = mb.rows * mb.patches_per_row
    d = DTYPE_BYTES[layout.dtype]
    return (cfg.vision_heads // layout.tp) * n * n * (4 + d)


def logits_bytes(cfg, layout: Layout, mb: MicroBatch) -> Dict[str, int]:
    """Log-prob buffers of one micro-batch on the last stage: ``held`` (contiguous logits + the
    shifted copy ``ops.token_stats`` saves, 3 fp32 stats and the int64 labels per token; with the
    fused head: the hidden rows, dHidden and dW) and ``transient`` (the logits' gradient in backward;
    with the fused head: one chunk and the fp32 dW sum of a 16-bit weight)."""
    v_local = padded_vocab(cfg, layout.tp) // layout.tp
    d = DTYPE_BYTES[layout.dtype]
    t = mb.tokens
    if layout.fused_head:
        from dualrpo_mcore.ops.fused_head import DEFAULT_CHUNK_BYTES

        whole = t * v_local * d * (2 + int(d < 4))  # logits, dz[, dW block] of all tokens at once
        acc32 = v_local * cfg.hidden_size * 4 if d < 4 else 0  # fused_head_loss sums dW in fp32
        # The update's fused_head_loss forms dHidden and dW in the forward and holds them until the
        # micro-batch's backward (the unfused head forms dW inside its backward instead).
        # The shifted hidden rows are a view of a one-row (packed) stream, a copy of several padded rows.
        hidden = (1 if mb.packed else 2) * t * cfg.hidden_size * d
        held = hidden + t * (3 * 4 + 8) + v_local * cfg.hidden_size * d
        return {"held": held, "transient": min(DEFAULT_CHUNK_BYTES, whole) + acc32}
    copies = 2 if mb.rows > 1 and not mb.packed else 1  # logits[:, :-1].reshape(...) is a view of one row
    held = copies * t * v_local * d + t * (3 * 4 + 8)
    return {"held": held, "transient": t * v_local * d}


# ---------------------------------------------------------------------------------------------- rollout
def sglang_weight_bytes(cfg, sglang_tp: int) -> int:
    """SGLang's bf16 copy of the whole model (ViT included, untied head counted once), per GPU of its TP group."""
    counts = stage_params(cfg, 1, 1, 0)
    return 2 * total_params(counts) // sglang_tp


def kv_bytes_per_token(cfg, sglang_tp: int) -> int:
    """K and V of every layer for one token, bf16, on one GPU of SGLang's TP group (kv heads are
    replicated when TP exceeds their number)."""
    kv_heads = max(1, cfg.num_kv_heads // sglang_tp)
    return 2 * cfg.num_layers * kv_heads * cfg.head_dim * 2


def sglang_budget_bytes(coloc: Colocation, held_at_start: int = 0) -> int:
    """What SGLang takes on a GPU (weights + KV pool): f x the memory free when it starts."""
    return int(coloc.mem_fraction * max(0, coloc.gpu_bytes - held_at_start))


def kv_pool_bytes(cfg, coloc: Colocation, held_at_start: int = 0) -> int:
    """KV pool per GPU (negative: SGLang would refuse to start)."""
    return sglang_budget_bytes(coloc, held_at_start) - sglang_weight_bytes(cfg, coloc.sglang_tp)


def kv_capacity_tokens(cfg, coloc: Colocation, held_at_start: int = 0) -> int:
    """Tokens the KV pool of one SGLang instance holds: pool / bytes per token."""
    return max(0, int(kv_pool_bytes(cfg, coloc, held_at_start) // kv_bytes_per_token(cfg, coloc.sglang_tp)))


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class StagePlan:
    """One GPU (a TP rank of pipeline stage ``stage``): bytes per component and per phase."""

    stage: int
    params: int
    trainable: int
    components: Dict[str, int] = field(default_factory=dict)
    train_peak: int = 0
    rollout_peak: int = 0
    reference_peak: int = 0
    held_at_engine_start: int = 0
    """What the actor holds when SGLang starts (sets SGLang's budget on this GPU)."""

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.rollout_peak, self.reference_peak)


@dataclass
class Plan:
    layout: Layout
    micro: MicroBatch
    num_microbatches: int
    coloc: Colocation
    stages: List[StagePlan]
    kv_capacity: int
    kv_needed: int
    kv_pool: int = 0

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def sglang_starts(self) -> bool:
        return self.coloc.mem_fraction == 0 or self.kv_pool > 0

    @property
    def fits(self) -> bool:
        return self.worst.peak <= self.coloc.gpu_bytes and self.sglang_starts

    @property
    def kv_sufficient(self) -> bool:
        return self.coloc.mem_fraction == 0 or self.kv_capacity >= self.kv_needed


def plan_stage(cfg, layout: Layout, mb: MicroBatch, num_micro: int, coloc: Colocation, stage: int) -> StagePlan:
    """Every component of one GPU of ``stage`` and the peak of each phase (training, rollout, and
    the reference forward when the reference is offloaded)."""
    counts = stage_params(cfg, layout.tp, layout.pp, stage)
    n_params, trainable = total_params(counts), trainable_params(counts, layout)
    first, last = stage == 0, stage == layout.pp - 1
    d = DTYPE_BYTES[layout.dtype]
    in_flight = min(layout.pp - stage, num_micro)  # 1F1B warm-up depth of this stage
    act = lm_activation_bytes(cfg, layout, mb, cfg.num_layers // layout.pp, first, last)
    if first:
        act += vision_activation_bytes(cfg, layout, mb)
    logits = logits_bytes(cfg, layout, mb) if last else {"held": 0, "transient": 0}
    # With the distributed optimizer the trainable params live in DDP's padded param buffer.
    stored = n_params - trainable + grad_buffer_elems(trainable, layout) if layout.distributed_optimizer else n_params
    c = {
        "parameters": stored * d,
        "gradients (fp32 buffer)": grad_bytes(trainable, layout),
        "optimizer state": optimizer_bytes(trainable, layout),
        "activations": in_flight * act,
        # forward: one ViT layer's scores (computed even when frozen); backward: recompute + logits grad
        "transient working set": max(vision_forward_transient(cfg, layout, mb) if first else 0,
                                     recompute_transient_bytes(cfg, layout, mb) + logits["transient"]),
        "log-prob buffers": logits["held"],
        "reference model": n_params * d if coloc.reference == "gpu" else 0,
        "CUDA context + allocator": coloc.overhead_bytes,
    }
    resident = c["parameters"] + c["gradients (fp32 buffer)"] + c["optimizer state"] + c["CUDA context + allocator"] \
        + c["reference model"]
    train = resident + c["activations"] + c["transient working set"] + c["log-prob buffers"]
    # At engine start the optimizer holds its fp32 main params (a third of 16-bit Adam state) but no moments yet.
    main = c["optimizer state"] // 3 if layout.dtype != "fp32" else 0
    held = c["parameters"] + c["gradients (fp32 buffer)"] + main + c["CUDA context + allocator"] + c["reference model"]
    sglang = sglang_budget_bytes(coloc, held)
    c["SGLang weights + KV (rollout)"] = sglang
    ref_fwd = resident + n_params * d if coloc.reference == "offload" else 0
    return StagePlan(stage, n_params, trainable, c, train_peak=train, rollout_peak=resident + sglang if sglang else 0,
                     reference_peak=ref_fwd, held_at_engine_start=held)


def num_microbatches(rows_per_rank: int, mb: MicroBatch) -> int:
    return max(1, -(-rows_per_rank // mb.rows))


def plan(cfg, layout: Layout, mb: MicroBatch, rows_per_rank: int, coloc: Colocation) -> Plan:
    """The whole plan: every pipeline stage (one TP rank each; TP ranks are alike), the KV check."""
    from dualrpo_mcore.models.qwen2_5_vl.config import check_parallel

    check_parallel(cfg, layout.tp, layout.pp)
    n_micro = num_microbatches(rows_per_rank, mb)
    stages = [plan_stage(cfg, layout, mb, n_micro, coloc, s) for s in range(layout.pp)]
    # SGLang's rank 0 shares GPU 0 with the first stage's TP rank 0.
    held = stages[0].held_at_engine_start
    kv_cap = kv_capacity_tokens(cfg, coloc, held) if coloc.mem_fraction else 0
    kv_pool = kv_pool_bytes(cfg, coloc, held) if coloc.mem_fraction else 0
    kv_need = -(-coloc.rollout_tokens // max(1, coloc.sglang_instances))
    return Plan(layout, mb, n_micro, coloc, stages, kv_cap, kv_need, kv_pool)


def biggest(stage: StagePlan, k: int = 3) -> List[str]:
    """The ``k`` largest components of the phase that sets the peak."""
    rollout = stage.rollout_peak >= stage.train_peak
    skip = {"activations", "transient working set", "log-prob buffers"} if rollout else {"SGLang weights + KV (rollout)"}
    items = sorted(((v, n) for n, v in stage.components.items() if n not in skip), reverse=True)
    return [n for v, n in items[:k] if v > 0]
