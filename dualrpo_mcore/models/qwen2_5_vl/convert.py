"""HF checkpoint directory <-> Megatron checkpoint, streaming one tensor at a time.

Megatron side layout (one directory, written to a temp dir and renamed, so it is atomic)::

    meta.json                        format, tp, pp, padded vocab, spec naming, HF config
    hf/                              config + tokenizer/processor files, carried over verbatim
    mp_rank_{tp:02d}_{pp:03d}/model.safetensors   that rank's module state dict

Conversion is pure tensor reshuffling through :mod:`mapping` (no process groups). HF tensors are
read lazily with ``safe_open``; at most one pipeline stage's shards are held at once. A checkpoint
written for one TP/PP loads into any other (:func:`load_into`) by re-merging the rank pieces.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import ExitStack, contextmanager
from typing import Dict, Iterator, List

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ...atomic import atomic_dir
from . import mapping
from .config import QwenVLConfig, from_hf

FORMAT = "dualrpo-mcore/qwen2_5_vl/v1"
WEIGHT_SUFFIXES = (".safetensors",)
# Files that are weights or weight indexes: everything else in the HF dir is carried over.
_SKIP = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _rank_dir(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


class HFReader:
    """Lazy access to the tensors of a HF directory by (published) name."""

    def __init__(self, hf_dir: str):
        self._stack = ExitStack()
        self._where: Dict[str, object] = {}
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(WEIGHT_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"{hf_dir}: no *.safetensors weights found")
        for fname in files:
            handle = self._stack.enter_context(safe_open(os.path.join(hf_dir, fname), framework="pt"))
            for key in handle.keys():
                self._where[mapping.normalize_hf_name(key)] = (handle, key)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"HF checkpoint has no tensor {name!r}")
        handle, key = self._where[name]
        return handle.get_tensor(key)

    def close(self) -> None:
        self._stack.close()


def _copy_side_files(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for fname in os.listdir(src):
        path = os.path.join(src, fname)
        if os.path.isfile(path) and not fname.endswith(WEIGHT_SUFFIXES) and fname not in _SKIP \
                and not fname.endswith(".bin"):
            shutil.copy2(path, os.path.join(dst, fname))


@contextmanager
def _atomic_dir(out_dir: str, reader) -> Iterator[str]:
    """:func:`dualrpo_mcore.atomic.atomic_dir` (a crash never leaves a half-written checkpoint under
    the real name; an existing ``out_dir`` is refused) that also closes ``reader`` either way."""
    try:
        with atomic_dir(out_dir) as tmp:
            yield tmp
    finally:
        reader.close()


def _bar(total: int, desc: str):
    """A progress line on stderr: a 7B checkpoint takes minutes to convert, silently otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, mininterval=1.0)


def hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, te_spec: bool = False,
                   vocab_divisible_by: int = 128) -> str:
    """Write a Megatron checkpoint for ``tp`` x ``pp`` from a HF directory. Returns ``out_dir``."""
    cfg = from_hf(hf_dir)
    mapping.layers_per_stage(cfg, pp)
    padded = cfg.padded_vocab_size(max(vocab_divisible_by, tp))
    conv = mapping.Converter(cfg, padded)
    reader = HFReader(hf_dir)
    rules = list(mapping.rules(cfg, pp))
    with _atomic_dir(out_dir, reader) as tmp, _bar(len(rules), "hf-to-mcore") as bar:
        for pp_rank in range(pp):
            shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(tp)]
            for rule in rules:
                if mapping.owner_stage(rule, cfg, pp) != pp_rank:
                    continue
                glob = conv.to_mcore(rule, [reader[n] for n in rule.hf])
                name = mapping.from_canonical(mapping.local_name(rule, cfg, pp), te_spec)
                for tp_rank in range(tp):
                    shards[tp_rank][name] = mapping.tp_shard(glob, rule.split, tp_rank, tp)
                bar.update(1)
            for tp_rank, sd in enumerate(shards):
                os.makedirs(os.path.join(tmp, _rank_dir(tp_rank, pp_rank)))
                save_file(sd, os.path.join(tmp, _rank_dir(tp_rank, pp_rank), "model.safetensors"),
                          metadata={"format": "pt"})
            del shards
        _copy_side_files(hf_dir, os.path.join(tmp, "hf"))
        meta = dict(format=FORMAT, tp=tp, pp=pp, padded_vocab_size=padded, te_spec=te_spec,
                    hf_config=cfg.hf)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    return out_dir


class MegatronReader:
    """Global (TP-merged) canonical tensors of a Megatron checkpoint written by this module."""

    def __init__(self, ckpt_dir: str):
        with open(os.path.join(ckpt_dir, "meta.json")) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{ckpt_dir}/meta.json: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.cfg: QwenVLConfig = from_hf(self.meta["hf_config"])
        self.tp, self.pp, self.te_spec = self.meta["tp"], self.meta["pp"], self.meta["te_spec"]
        self._stack = ExitStack()
        self._files = {}
        for t in range(self.tp):
            for p in range(self.pp):
                path = os.path.join(ckpt_dir, _rank_dir(t, p), "model.safetensors")
                self._files[t, p] = self._stack.enter_context(safe_open(path, framework="pt"))

    def global_tensor(self, rule: mapping.Rule) -> torch.Tensor:
        p = mapping.owner_stage(rule, self.cfg, self.pp)
        name = mapping.from_canonical(mapping.local_name(rule, self.cfg, self.pp), self.te_spec)
        return mapping.tp_merge([self._files[t, p].get_tensor(name) for t in range(self.tp)], rule.split)

    def close(self) -> None:
        self._stack.close()


def _exported_rules(reader: MegatronReader) -> List[mapping.Rule]:
    """The rules whose tensors go to the HF directory: all but the last stage's copy of a tied embedding."""
    tied = reader.cfg.tie_word_embeddings
    return [r for r in mapping.rules(reader.cfg, reader.pp) if not (tied and r.mcore.endswith("output_layer.weight"))]


def _hf_tensors(reader: MegatronReader) -> Iterator[tuple[str, torch.Tensor]]:
    conv = mapping.Converter(reader.cfg, reader.meta["padded_vocab_size"])
    for rule in _exported_rules(reader):
        for name, t in zip(rule.hf, conv.to_hf(rule, reader.global_tensor(rule))):
            yield name, t


def megatron_to_hf(ckpt_dir: str, out_dir: str, max_shard_bytes: int = 5 * 1024 ** 3) -> str:
    """Write a HF directory (published tensor names, sharded safetensors + index) from a Megatron
    checkpoint, carrying the config/tokenizer/processor files over. Returns ``out_dir``."""
    reader = MegatronReader(ckpt_dir)
    tensors = sum(len(r.hf) for r in _exported_rules(reader))
    with _atomic_dir(out_dir, reader) as tmp, _bar(tensors, "mcore-to-hf") as bar:
        shards: List[Dict[str, torch.Tensor]] = [{}]
        size = 0
        files: List[str] = []
        weight_map: Dict[str, int] = {}
        for name, t in _hf_tensors(reader):
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                files.append(_flush(tmp, shards[-1], len(files)))
                shards[-1], size = {}, 0
            shards[-1][name] = t
            size += nbytes
            weight_map[name] = len(files)
            bar.update(1)
        files.append(_flush(tmp, shards[-1], len(files)))
        _finish_hf_dir(tmp, files, weight_map, ckpt_dir)
    return out_dir


def _flush(tmp: str, sd: Dict[str, torch.Tensor], index: int) -> str:
    fname = f"model-{index:05d}.safetensors"
    save_file(sd, os.path.join(tmp, fname), metadata={"format": "pt"})
    return fname


def _finish_hf_dir(tmp: str, files: List[str], weight_map: Dict[str, int], ckpt_dir: str) -> None:
    """Name shards as transformers does and write the index; copy the side files."""
    n = len(files)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for old, new in zip(files, final):
        os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
    if n > 1:
        total = sum(os.path.getsize(os.path.join(tmp, f)) for f in final)
        index = dict(metadata={"total_size": total}, weight_map={k: final[v] for k, v in sorted(weight_map.items())})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    side = os.path.join(ckpt_dir, "hf")
    if os.path.isdir(side):
        _copy_side_files(side, tmp)


def load_into(model: torch.nn.Module, ckpt_dir: str, tp_rank: int, tp: int, pp_rank: int, pp: int,
              te_spec: bool = False, strict: bool = True) -> None:
    """Load a checkpoint written at any TP/PP into this rank's model stage (resharding on the fly)."""
    reader = MegatronReader(ckpt_dir)
    try:
        cfg = reader.cfg
        sd = {}
        for rule in mapping.rules(cfg, pp):
            if mapping.owner_stage(rule, cfg, pp) != pp_rank:
                continue
            src_rule = rule
            if rule.mcore.endswith("output_layer.weight") and cfg.tie_word_embeddings and reader.pp == 1:
                src_rule = next(r for r in mapping.rules(cfg, 1) if r.mcore.endswith("word_embeddings.weight"))
            glob = reader.global_tensor(src_rule)
            sd[mapping.from_canonical(mapping.local_name(rule, cfg, pp), te_spec)] = \
                mapping.tp_shard(glob, rule.split, tp_rank, tp)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if strict and (missing or unexpected):
            raise RuntimeError(f"{ckpt_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    finally:
        reader.close()
