"""Counting the torch.distributed collectives an op issues (the TP tests assert one per direction)."""
import torch.distributed as dist

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "all_to_all", "all_to_all_single")


def count_collectives(counter: list) -> None:
    """Wrap every collective of ``torch.distributed`` in this process so each call appends its name."""
    for name in COLLECTIVES:
        fn = getattr(dist, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            counter.append(_name)
            return _fn(*a, **k)
        setattr(dist, name, wrapped)
