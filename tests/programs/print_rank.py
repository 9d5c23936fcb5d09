"""Join the process group the way medgpt does and print what this process is in it, with the sum
of one all-reduce over every rank:

    rank <rank> of <world size> local <local rank> sum <world size>
"""
import torch

from medgpt.distributed import init_distributed

dist = init_distributed()
print(f"rank {dist.rank} of {dist.world_size} local {dist.local_rank} sum {dist.all_reduce_sum([1.0])[0]:g}")
# Closed before exit: gloo's threads can abort an interpreter that exits with the group open.
torch.distributed.destroy_process_group()
