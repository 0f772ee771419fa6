"""Two ranks join the group, print once, then block forever in a sleep: no steps, no output, no CPU.

For the idle-hang watchdog test (a program that reports no steps): the only
signs that it hangs are silence and CPU time that stops advancing.
"""

import time

import mlx.core as mx


def idle_here():
    while True:
        time.sleep(3600)


def main():
    group = mx.distributed.init()
    x = mx.distributed.all_sum(mx.ones(4))
    mx.eval(x)
    print(f"rank {group.rank()} joined: {x.tolist()}", flush=True)
    idle_here()


if __name__ == "__main__":
    main()
