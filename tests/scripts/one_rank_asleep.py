"""Rank 1 falls asleep outside the collective rank 0 then waits in: the commonest hang.

MLX's ring busy-waits inside ``all_sum``, so rank 0 burns a core while it
waits: only rank 1's CPU time stops advancing. No steps, no output.
"""

import time

import mlx.core as mx


def asleep_here():
    while True:
        time.sleep(3600)


def main():
    group = mx.distributed.init()
    mx.eval(mx.distributed.all_sum(mx.ones(4)))
    print(f"rank {group.rank()} joined", flush=True)
    if group.rank() == 1:
        asleep_here()
    mx.eval(mx.distributed.all_sum(mx.ones(4)))  # waits for rank 1 forever


if __name__ == "__main__":
    main()
