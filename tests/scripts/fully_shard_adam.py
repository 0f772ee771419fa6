"""A plain MLX training script (nothing orch-specific): 20 Adam steps of an MLP, data parallel or fully sharded.

``--mode fsdp`` wraps the model in ``nn.fully_shard`` (each rank keeps 1/N of every parameter; gradients are
reduce-scattered with ``mx.distributed.sum_scatter``); ``--mode dp`` keeps the whole model and averages
gradients with ``nn.average_gradients``. Every rank draws its own batch, so both average the same gradients.
The loss is averaged with an ``all_sum`` evaluated together with the update, as training scripts do.

At the end rank 0 writes the full model (shards gathered) to ``--out`` (.npz) and every rank prints one
``fully_shard_adam {json}`` line with how many parameter elements it held.
"""

import argparse
import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

parser = argparse.ArgumentParser()
parser.add_argument("--mode", choices=["dp", "fsdp"], required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

group = mx.distributed.init()
n, rank = group.size(), group.rank()
mx.random.seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
mx.eval(model.parameters())
full_elements = sum(v.size for _, v in tree_flatten(model.parameters()))
if args.mode == "fsdp":
    model = nn.fully_shard(model)
optimizer = optim.Adam(learning_rate=1e-2)


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x), y)


step_fn = nn.value_and_grad(model, loss_fn)
target = mx.random.normal((32, 8), key=mx.random.key(7))
losses = []
for step in range(args.steps):
    x = mx.random.normal((16, 32), key=mx.random.key(1000 * step + rank))
    y = mx.tanh(x @ target)
    loss, grads = step_fn(model, x, y)
    if args.mode == "dp":
        grads = nn.average_gradients(grads)
    optimizer.update(model, grads)
    mean_loss = mx.distributed.all_sum(loss) / n
    mx.eval(model.parameters(), optimizer.state, mean_loss)
    losses.append(mean_loss.item())

params = tree_flatten(model.parameters())
held = sum(v.size for _, v in params)
if args.mode == "fsdp":  # shards are axis-0 slices in rank order: gathering them gives the full parameter
    params = [(k.removeprefix("module."), mx.distributed.all_gather(v)) for k, v in params]
mx.eval([v for _, v in params])
if rank == 0:
    mx.savez(args.out, **dict(params))
print("fully_shard_adam " + json.dumps({"rank": rank, "size": n, "mode": args.mode, "held_elements": held,
                                        "full_elements": full_elements, "losses": losses}), flush=True)
