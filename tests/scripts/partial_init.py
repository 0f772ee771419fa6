"""Rank LATE_RANK never calls init (it sleeps); the others do and block."""
import os
import time

import mlx.core as mx

if int(os.environ["MLX_RANK"]) == int(os.environ.get("LATE_RANK", "1")):
    time.sleep(300)
mx.distributed.init()
