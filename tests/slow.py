"""Runs a command of the package with a pause after each train step or anchor shard, so that a
test can kill it part-way at a known point.

    python tests/slow.py --step_delay=1.0 ablate_jax.train --config=... --workdir=...
    python tests/slow.py --shard_delay=1.5 ablate_jax.anchors --config=... --workdir=...

The pauses are added here, by wrapping the package's own functions, so the package carries no
test hooks.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import time


def _slow_train_steps(delay: float) -> None:
    from ablate_jax import train

    compiled = train.compiled_train_step

    @functools.wraps(compiled)
    def slowed(*args, **kwargs):
        step = compiled(*args, **kwargs)

        def run(*a):
            out = step(*a)
            time.sleep(delay)  # also lets the asynchronous checkpoint of this step finish
            return out

        return run

    train.compiled_train_step = slowed


def _slow_shards(delay: float) -> None:
    from ablate_jax import anchor_store

    write = anchor_store.write_shard

    @functools.wraps(write)
    def slowed(*args, **kwargs):
        out = write(*args, **kwargs)
        time.sleep(delay)
        return out

    anchor_store.write_shard = slowed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step_delay", type=float, default=0.0)
    parser.add_argument("--shard_delay", type=float, default=0.0)
    parser.add_argument("module")
    args, rest = parser.parse_known_args()
    if args.step_delay:
        _slow_train_steps(args.step_delay)
    if args.shard_delay:
        _slow_shards(args.shard_delay)
    module = importlib.import_module(args.module)
    return module.main([args.module, *rest])


if __name__ == "__main__":
    sys.exit(main())
