"""``python -m mtcoll.train``: pipeline- and data-parallel training of a numpy MLP over mtcoll.

Examples::

    mpiexec -n 4 python -m mtcoll.train --stages 2 --replicas 2 --schedule layerpipe
    mpiexec -n 2 python -m mtcoll.train --stages 2 --schedule gpipe --json out.json
    python -m mtcoll.train --schedule sequential
    mpiexec -n 4 python -m mtcoll.train --stages 4 --schedule pipedream --data teacher

Launch ``stages * replicas`` processes (``--replicas`` defaults to the world size / stages).
Rank 0 prints one line per epoch to stderr (and the table to stdout): loss, test accuracy, wall
time, and the share of the time in the gradient allreduce and in pipeline waits (averaged over
ranks). ``--json [FILE]`` (no FILE or '-': stdout) writes ``{"config", "partition", "epochs"}``.
"""

from __future__ import annotations

import argparse
import json

from mpi4py import MPI

from .._cli import entry, line, say

from . import _data, _model
from ._pipeline import SCHEDULES
from ._trainer import Config, run


def _parser():
    d = Config()
    doc = __doc__.splitlines()
    p = argparse.ArgumentParser(prog="python -m mtcoll.train", description=doc[0],
                                epilog="\n".join(doc[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    p.add_argument("--stages", type=int, default=None,
                   help=f"pipeline stages S (default: {d.stages}; 1 for sequential)")
    p.add_argument("--replicas", type=int, default=None,
                   help="data-parallel replicas R of each stage (default: world size / S)")
    p.add_argument("--data", default=d.data, choices=_data.DATASETS)
    p.add_argument("--depth", type=int, default=d.depth, help="hidden layers (default: %(default)s)")
    p.add_argument("--width", type=int, default=d.width, help="hidden units (default: %(default)s)")
    p.add_argument("--activation", default=d.activation, choices=_model.ACTIVATIONS)
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch,
                   help="global mini-batch, split over replicas (default: %(default)s)")
    p.add_argument("--micro-batches", type=int, default=d.micro_batches,
                   help="micro-batches per replica and mini-batch, gpipe/1f1b (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="(default: %(default)s)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--algorithm", default=d.algorithm,
                   help="mtcoll algorithm of the gradient allreduce: multitree, ring, native, "
                        "auto, ... (default: %(default)s)")
    p.add_argument("--bucket-bytes", type=int, default=d.bucket_bytes,
                   help="gradient bucket size (default: %(default)s)")
    p.add_argument("--partition", default=None,
                   help="first layer of each stage, comma list (default: balanced by measured cost)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write one JSON object to FILE (no FILE or '-': stdout, instead of the table)")
    return p


def _one_blas_thread():
    # Ranks share the cores: a multi-threaded BLAS in every rank oversubscribes them (10x
    # slower on the 2-core development machine). numpy is already imported, so the environment
    # variables are too late; threadpoolctl (a scikit-learn dependency) limits the live pools.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(1)


def main(argv=None):
    args = _parser().parse_args(argv)
    _one_blas_thread()
    world = MPI.COMM_WORLD
    size = world.Get_size()
    if args.schedule == "sequential":
        stages = args.stages or 1
        replicas = args.replicas or 1
    else:
        stages = args.stages or Config().stages
        replicas = args.replicas or max(size // stages, 1)
    cfg = Config(schedule=args.schedule, stages=stages, replicas=replicas, data=args.data,
                 depth=args.depth, width=args.width, activation=args.activation,
                 epochs=args.epochs, batch=args.batch, micro_batches=args.micro_batches,
                 lr=args.lr, momentum=args.momentum, seed=args.seed, algorithm=args.algorithm,
                 bucket_bytes=args.bucket_bytes,
                 partition=[int(a) for a in args.partition.split(",")] if args.partition else None)
    rank = world.Get_rank()
    to_stdout = args.json == "-"
    # the table goes to stdout, or to stderr when the JSON takes stdout
    row = say if to_stdout else line
    if rank == 0:
        say(f"mtcoll.train: {cfg.schedule}, {cfg.stages} stages x {cfg.replicas} replicas, "
            f"{cfg.data}, MLP depth {cfg.depth} width {cfg.width} {cfg.activation}, "
            f"algorithm {cfg.algorithm}")
        row(f"{'epoch':>5} {'loss':>9} {'test acc':>8} {'seconds':>8} {'allreduce':>9} "
            f"{'waits':>6}")

    def log(rec):
        row(f"{rec['epoch']:>5} {rec['loss']:>9.4f} {rec['test_accuracy']:>8.4f} "
            f"{rec['seconds']:>8.2f} {rec['allreduce_share']:>9.1%} "
            f"{rec['pipeline_wait_share']:>6.1%}")

    if cfg.schedule == "sequential" or size == cfg.stages * cfg.replicas:
        comm = world
    else:
        if size < cfg.stages * cfg.replicas:
            raise SystemExit(f"{cfg.stages} stages x {cfg.replicas} replicas need "
                             f"{cfg.stages * cfg.replicas} processes; launched {size}")
        comm = world.Split(0 if rank < cfg.stages * cfg.replicas else MPI.UNDEFINED, rank)
        if comm == MPI.COMM_NULL:
            return None
    result = run(cfg, comm, log=log)
    if rank == 0 and result is not None:
        result = {k: v for k, v in result.items() if k != "params"}
        result["processes"] = cfg.stages * cfg.replicas
        result["total_seconds"] = sum(e["seconds"] for e in result["epochs"])
        if args.json is not None:
            text = json.dumps(result, indent=1)
            if to_stdout:
                print(text)
            else:
                with open(args.json, "w") as fh:
                    fh.write(text + "\n")
    return result


def _main():
    main()
    return 0


if __name__ == "__main__":
    entry(_main)
