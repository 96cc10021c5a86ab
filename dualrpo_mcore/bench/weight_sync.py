"""``dualrpo bench weight-sync``: GB/s of the rollout weight export (TP gather + HF conversion +
bucketing, ``rollout.sync.BucketedExporter``) for a model config, against baselines measured in the
same run on the same model:

* ``bucketed``   the exporter, every bucket consumed and dropped (what weight sync does)
* ``gather-all`` (a) ``models.qwen2_5_vl.weights.export_hf`` collected into one dict: the same
  gathers and conversions, no bucketing, everything held at once
* ``copy``       (b) one ``torch.cat`` of this rank's local shards: memory-bandwidth bound of
  touching the same bytes once, no communication

GB/s counts the bytes of the full HF tensors produced (for ``copy``: the local bytes copied). With
``--freeze-vision`` the bucketed rows time a repeat sync, which skips the ViT (sent once): their GB/s
counts only the bytes sent, so compare the ms column against ``gather-all`` there.
Peak extra memory: new tensor storage alive at once (``rollout.memcensus``, a separate untimed run;
gloo's internal staging copy is not a tensor and not counted); ``bound`` = max(bucket, largest) +
largest tensor. Runs as
``--tp`` gloo processes on CPU (the bench machine's cores are shared by all ranks).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

# --preset name -> the shape in models.qwen2_5_vl.presets (the one place for model shapes)
PRESETS = {"tiny": "bench-tiny", "small": "bench-small", "medium": "bench-medium"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--config", default=None,
                        help="a Hugging Face Qwen2.5-VL config (directory or config.json); overrides --preset")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel processes (gloo, CPU)")
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[16.0, 64.0], help="bucket sizes")
    parser.add_argument("--freeze-vision", action="store_true", help="second and later syncs skip the ViT")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best is reported)")
    parser.add_argument("--json", default=None, help="write results here as JSON")


def hf_config(preset: str):
    from dualrpo_mcore.models.qwen2_5_vl import presets

    return presets.hf_config(PRESETS[preset])


def _timed(fn, repeats):
    import torch.distributed as dist

    best = float("inf")
    for i in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        best = min(best, time.perf_counter() - t0)
        if dist.get_rank() == 0:  # progress: a medium model takes tens of seconds over its methods
            print(f"  weight-sync: repeat {i + 1}/{repeats} {time.perf_counter() - t0:.2f} s", file=sys.stderr,
                  flush=True)
    return best


def _peak(fn, model):
    from dualrpo_mcore.rollout.memcensus import peak_new_bytes

    return peak_new_bytes(fn, [t for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)])


def _drain(it):
    for _ in it:
        pass


def _worker(rank, world, preset, bucket_mbs, repeats, freeze_vision, config_path=None):
    from dualrpo_mcore.models.qwen2_5_vl import build_model
    from dualrpo_mcore.models.qwen2_5_vl.model import ModelOptions
    from dualrpo_mcore.models.qwen2_5_vl.training import ModuleTraining, apply_freeze
    from dualrpo_mcore.models.qwen2_5_vl.weights import export_hf
    from dualrpo_mcore.parallel import initialize
    from dualrpo_mcore.rollout.sync import BucketedExporter

    initialize(world, 1, backend="gloo")
    with torch.no_grad():
        model = build_model(config_path or hf_config(preset), ModelOptions(spec_backend="local"))
    if freeze_vision:
        apply_freeze(model, ModuleTraining(freeze_vision=True))
    local = [p.detach() for p in model.parameters()]
    local_bytes = sum(p.numel() * p.element_size() for p in local)
    full_bytes = sum(t.numel() * t.element_size() for _, t in export_hf(model))
    rows = [dict(method="copy (b)", bytes=local_bytes,
                 seconds=_timed(lambda: torch.cat([p.reshape(-1) for p in local]), repeats),
                 peak=_peak(lambda: torch.cat([p.reshape(-1) for p in local]), model))]
    rows.append(dict(method="gather-all (a)", bytes=full_bytes,
                     seconds=_timed(lambda: dict(export_hf(model)), repeats),
                     peak=_peak(lambda: dict(export_hf(model)), model)))
    for mb in bucket_mbs:
        exp = BucketedExporter(int(mb * (1 << 20)))
        _drain(exp.buckets(model))  # first sync (sends frozen tensors once)
        seconds = _timed(lambda: _drain(exp.buckets(model)), repeats)
        stats = exp.last_stats
        rows.append(dict(method=f"bucketed {mb:g} MiB", bytes=stats.bytes, seconds=seconds,
                         peak=_peak(lambda: _drain(exp.buckets(model)), model), buckets=stats.buckets,
                         held=stats.peak_held_bytes, bound=max(exp.bucket_bytes, stats.largest_bytes)
                         + stats.largest_bytes, skipped_frozen=stats.skipped_frozen))
    return dict(rows=rows, full_bytes=full_bytes, local_bytes=local_bytes)


def _print(res, args):
    rows = res["rows"]
    base = {r["method"]: r["bytes"] / r["seconds"] for r in rows}
    print(f"weight-sync  model={args.config or args.preset}  tp={args.tp}  full model {res['full_bytes'] / 2**20:.1f} MiB, "
          f"rank 0 shard {res['local_bytes'] / 2**20:.1f} MiB")
    print(f"{'method':<22}{'MiB':>9}{'ms':>10}{'GB/s':>8}{'vs gather-all':>15}{'vs copy':>9}"
          f"{'peak MiB':>10}{'bound MiB':>11}")
    for r in rows:
        gbs = r["bytes"] / r["seconds"] / 1e9
        bound = f"{r['bound'] / 2**20:11.2f}" if "bound" in r else " " * 11
        print(f"{r['method']:<22}{r['bytes'] / 2**20:9.1f}{r['seconds'] * 1e3:10.1f}{gbs:8.2f}"
              f"{base[r['method']] / base['gather-all (a)']:15.2f}{base[r['method']] / base['copy (b)']:9.2f}"
              f"{r['peak'] / 2**20:10.2f}{bound}")


def run(args) -> int:
    import warnings

    from dualrpo_mcore.parallel.spawn import run_distributed

    from .common import write_json

    warnings.filterwarnings("ignore", category=UserWarning)
    res = run_distributed(_worker, args.tp, args.preset, args.bucket_mb, args.repeats, args.freeze_vision,
                          args.config, timeout=1800)[0]
    _print(res, args)
    if args.json:
        write_json(args.json, "weight-sync", args, res)
    return 0
