"""A gloo rank for test_contrastive (kept free of heavy imports: spawned processes import this module)."""

import json
from pathlib import Path


def sampler_rank(rank, world, init_file, out_file):
    import torch.distributed as dist

    from moca.data.sampler import TaskBatchSampler

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        s = TaskBatchSampler([40, 17, 26], [3.0, 1.0, 1.0], global_batch_size=6, world_size=world, rank=rank, seed=11)
        mine = [(d.step, d.subset, d.global_indices, d.indices) for d in (s.next() for _ in range(50))]
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            Path(out_file).write_text(json.dumps(everyone))
    finally:
        dist.destroy_process_group()
