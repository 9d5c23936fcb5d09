"""Join the process group the way medgpt does and print what this process is in it, with the sum
of one all-reduce over every rank:

    rank <rank> of <world size> local <local rank> sum <world size>
"""

from medgpt.distributed import init_distributed
from medgpt.shutdown import exit_process

dist = init_distributed()
print(f"rank {dist.rank} of {dist.world_size} local {dist.local_rank} sum {dist.all_reduce_sum([1.0])[0]:g}")
exit_process(0)  # not a plain exit: gloo's threads can abort it (medgpt/shutdown.py)
