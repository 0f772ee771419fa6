"""Uses mpi4py *before* MLX's collectives (the order that aborts Open MPI without orch's fix)."""
from mpi4py import MPI

import mlx.core as mx

comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1)
g = mx.distributed.init()
x = mx.distributed.all_sum(mx.array([float(g.rank() + 1)]))
mx.eval(x)
print(f"MPI4PY rank {comm.Get_rank()}/{comm.Get_size()} mpi4py={total} mlx={x.item():g}", flush=True)
