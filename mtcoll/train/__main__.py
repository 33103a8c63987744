"""``python -m mtcoll.train``: pipeline- and data-parallel training over mtcoll, after LayerPipe.

Examples::

    mpiexec -n 4 python -m mtcoll.train --stages 2 --replicas 2 --schedule layerpipe
    mpiexec -n 2 python -m mtcoll.train --stages 2 --schedule gpipe --json out.json
    python -m mtcoll.train --schedule sequential
    mpiexec -n 4 python -m mtcoll.train --stages 4 --schedule pipedream --data teacher
    mpiexec -n 8 python -m mtcoll.train --stages 8 --compute emulate --profile vgg16 \\
        --schedule pipedream,layerpipe

Launch exactly ``stages * replicas`` processes (``--replicas`` defaults to the world size /
stages; a layout that leaves a process idle is refused). Each stage runs the task list that
the schedule model (``python -m mtcoll.train.pipeline``) chooses, including layerpipe's moved W
and Bew tasks.

``--compute real`` trains the numpy MLP: rank 0 prints one line per epoch (loss, test accuracy,
wall time, the shares of time in the gradient allreduce and in waits, and the steady-state
mini-batches per second against the model's prediction for the same placement).
``--compute emulate`` makes every task sleep its modelled time (``--profile`` cost x
``--seconds``) with real messages of the profile's sizes (x ``--elements``); rank 0 prints one
row per schedule. ``--schedule`` takes a comma list: the schedules run one after the other in
the same job, and their throughput is compared with pipedream's, measured and modelled.
Progress goes to stderr, the table to stdout; ``--json [FILE]`` (no FILE or '-': stdout)
writes one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import json
import sys

from mpi4py import MPI

from .._cli import entry, line, say
from . import _data, _mlp
from ._trainer import COMMS, COMPUTE, SCHEDULES, Config, run


class _Parser(argparse.ArgumentParser):
    """argparse that prints its usage, help and errors on rank 0 only (every rank exits)."""

    def _print_message(self, message, file=None):
        if MPI.COMM_WORLD.Get_rank() == 0:
            super()._print_message(message, file)


def _parser():
    d = Config()
    doc = __doc__.splitlines()
    p = _Parser(prog="python -m mtcoll.train", description=doc[0], epilog="\n".join(doc[2:]),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", default=d.schedule,
                   help=f"one of {', '.join(SCHEDULES)}, or a comma list of the pipelined ones "
                        "(default: %(default)s)")
    p.add_argument("--stages", type=int, default=None,
                   help=f"pipeline stages S (default: {d.stages}; 1 for sequential)")
    p.add_argument("--replicas", type=int, default=None,
                   help="data-parallel replicas R of each stage (default: world size / S)")
    p.add_argument("--compute", default=d.compute, choices=COMPUTE,
                   help="real: the numpy MLP; emulate: every task sleeps its modelled time "
                        "(default: %(default)s)")
    p.add_argument("--data", default=d.data, choices=_data.DATASETS)
    p.add_argument("--depth", type=int, default=d.depth, help="hidden layers (default: %(default)s)")
    p.add_argument("--width", type=int, default=d.width, help="hidden units (default: %(default)s)")
    p.add_argument("--hidden", default=None, metavar="W1,W2,...",
                   help="hidden widths, one per layer (overrides --depth/--width); uneven "
                        "widths give uneven layer costs, e.g. 64,512,512,512,64,64")
    p.add_argument("--activation", default=d.activation, choices=_mlp.ACTIVATIONS)
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch", type=int, default=d.batch,
                   help="global mini-batch, split over replicas (default: %(default)s)")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches per replica and mini-batch, gpipe/1f1b (default: 4; "
                        "with --compute emulate S)")
    p.add_argument("--lr", type=float, default=d.lr, help="(default: %(default)s)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--algorithm", default=d.algorithm,
                   help="mtcoll algorithm of the gradient allreduce: multitree, ring, native, "
                        "auto, ... (default: %(default)s)")
    p.add_argument("--comm", default=d.comm, choices=COMMS,
                   help="the gradient allreduce on an mtcoll.Comm (with --algorithm), or on the "
                        "plain mpi4py communicator, for comparison (default: %(default)s)")
    p.add_argument("--bucket-bytes", type=int, default=d.bucket_bytes,
                   help="gradient bucket size (default: %(default)s)")
    p.add_argument("--partition", default=None,
                   help="first layer of each stage, comma list (default: the model's choice)")
    p.add_argument("--profile", default=d.profile,
                   help="emulate: the cost profile, vgg16 or uniform:L (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=d.seconds,
                   help="emulate: seconds per unit of the profile's cost (default: %(default)s; "
                        "vgg16's unit is a multiply-accumulate)")
    p.add_argument("--elements", type=float, default=d.elements,
                   help="emulate: message elements per element of the profile's activations "
                        "and weights (default: %(default)s)")
    p.add_argument("--batches", type=int, default=None,
                   help="emulate: mini-batches of the run (default: 16*S+32, as the model)")
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


def _ints(text, option):
    try:
        return [int(a) for a in text.split(",")]
    except ValueError:
        raise SystemExit(f"{option} {text!r}: a comma list of integers") from None


def _plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _configs(args, size):
    """The configuration of every requested schedule, checked before anything runs (the same
    on every rank, so that every rank fails alike)."""
    schedules = [s.strip() for s in args.schedule.split(",") if s.strip()]
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad or not schedules:
        raise SystemExit(f"--schedule {args.schedule!r}: choose from {', '.join(SCHEDULES)}")
    if "sequential" in schedules and len(schedules) > 1:
        raise SystemExit("--schedule sequential runs alone (one process)")
    if schedules == ["sequential"]:
        stages, replicas = args.stages or 1, args.replicas or 1
        if size != 1:
            raise SystemExit(f"--schedule sequential runs on one process; launched {size} "
                             "(run it without mpiexec, or with -n 1)")
    else:
        stages = args.stages or Config().stages
        if stages < 1:
            raise SystemExit(f"--stages {stages} must be at least 1")
        replicas = args.replicas or max(size // stages, 1)
        if stages * replicas != size:
            # Refused rather than warned about: a process left idle is never what was meant,
            # and a warning scrolls away with the table. The fix is one number.
            hint = (f"launch {stages * replicas}" if args.replicas else
                    f"launch a multiple of {stages}")
            raise SystemExit(f"{_plural(stages, 'stage')} x {_plural(replicas, 'replica')} "
                             f"need {stages * replicas} processes; launched {size} ({hint}, "
                             f"or change --stages/--replicas)")
    cfgs = []
    for schedule in schedules:
        cfg = Config(schedule=schedule, stages=stages, replicas=replicas, compute=args.compute,
                     data=args.data, depth=args.depth, width=args.width,
                     hidden=_ints(args.hidden, "--hidden") if args.hidden else None,
                     activation=args.activation, epochs=args.epochs, batch=args.batch,
                     micro_batches=args.micro_batches, lr=args.lr, momentum=args.momentum,
                     seed=args.seed, algorithm=args.algorithm, comm=args.comm,
                     bucket_bytes=args.bucket_bytes,
                     partition=_ints(args.partition, "--partition") if args.partition else None,
                     profile=args.profile, seconds=args.seconds, elements=args.elements,
                     batches=args.batches)
        try:
            cfg.check()
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        cfgs.append(cfg)
    return cfgs


def _fmt(x, spec):
    """``x`` formatted, or a right-aligned '-' for a figure the run could not measure."""
    if x is None:
        return format("-", spec.split(".")[0].rstrip("f") if "." in spec else spec)
    return format(x, spec)


def _vs_pipedream(results):
    """Each schedule's throughput over pipedream's, measured and modelled (same job)."""
    last = {r["config"]["schedule"]: r["epochs"][-1]["throughput"] for r in results}
    model = {r["config"]["schedule"]: r["model"]["makespan"] for r in results}
    if "pipedream" not in last or last["pipedream"]["mini_batches_per_s"] is None:
        return None
    out = {}
    for s, t in last.items():
        if s == "pipedream" or t["mini_batches_per_s"] is None:
            continue
        meas = t["mini_batches_per_s"] / last["pipedream"]["mini_batches_per_s"]
        mod = model["pipedream"] / model[s]
        out[s] = {"measured": meas, "model": mod, "measured_over_model": meas / mod}
    return out


def main(argv=None):
    """Run the CLI; returns rank 0's result. A bad layout or option raises SystemExit with a
    message on every rank alike, before anything is printed or launched."""
    args = _parser().parse_args(argv)
    _one_blas_thread()
    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    cfgs = _configs(args, size)
    to_stdout = args.json == "-"
    # the table goes to stdout, or to stderr when the JSON takes stdout (whole lines, stderr
    # flushed before each stdout line)
    row = say if to_stdout else line
    emulate = args.compute == "emulate"
    c0 = cfgs[0]
    if rank == 0:
        what = (f"emulated {c0.profile} (x {c0.seconds:g} s per unit, messages x "
                f"{c0.elements:g})" if emulate else
                f"{c0.data}, MLP {'hidden ' + ','.join(map(str, c0.sizes_hidden))} "
                f"{c0.activation}")
        say(f"mtcoll.train: {','.join(c.schedule for c in cfgs)}, "
            f"{_plural(c0.stages, 'stage')} x {_plural(c0.replicas, 'replica')}, {what}, "
            + (f"algorithm {c0.algorithm}" if c0.comm == "mtcoll" else "plain mpi4py allreduce"))
        if emulate:
            row(f"{'schedule':<10} {'batches':>7} {'mb/s':>8} {'model':>8} {'meas/mod':>8} "
                f"{'bubble':>6} {'model':>6} {'allred':>6}  busy per stage")
    header = (f"{'epoch':>5} {'loss':>9} {'test acc':>8} {'seconds':>8} {'allreduce':>9} "
              f"{'waits':>6} {'mb/s':>8} {'meas/mod':>8}")
    if rank == 0 and not emulate and len(cfgs) == 1:
        row(header)

    def log(rec):
        if emulate:
            return
        t = rec.get("throughput") or {}
        row(f"{rec['epoch']:>5} {rec['loss']:>9.4f} {rec['test_accuracy']:>8.4f} "
            f"{rec['seconds']:>8.2f} {rec['allreduce_share']:>9.1%} "
            f"{rec['pipeline_wait_share']:>6.1%} {_fmt(t.get('mini_batches_per_s'), '>8.2f')} "
            f"{_fmt(t.get('measured_over_model'), '>8.3f')}")

    results = []
    for cfg in cfgs:
        if rank == 0 and len(cfgs) > 1 and not emulate:
            row(f"-- {cfg.schedule}")
            row(header)
        res = run(cfg, world, log=log)
        if rank == 0:
            res = {k: v for k, v in res.items() if k != "params"}
            res["processes"] = cfg.stages * cfg.replicas
            res["total_seconds"] = sum(e["seconds"] for e in res["epochs"])
            results.append(res)
            if emulate:
                t = res["epochs"][-1]["throughput"]
                busy = " ".join(f"{b:.2f}" for b in t["stage_busy"] or [])
                row(f"{cfg.schedule:<10} {t['mini_batches']:>7} "
                    f"{_fmt(t['mini_batches_per_s'], '>8.3f')} "
                    f"{t['model_mini_batches_per_s']:>8.3f} "
                    f"{_fmt(t['measured_over_model'], '>8.3f')} {_fmt(t['bubble'], '>6.3f')} "
                    f"{1 - t['model_utilization']:>6.3f} {t['allreduce_share']:>6.1%}  {busy}")
    if rank != 0:
        return None
    vs = _vs_pipedream(results) if len(results) > 1 else None
    if vs:
        for s, v in vs.items():
            row(f"{s} / pipedream: measured {v['measured']:.3f}x, model {v['model']:.3f}x "
                f"(measured/model {v['measured_over_model']:.3f})")
    out = results[0] if len(results) == 1 else {"runs": results, "vs_pipedream": vs}
    if args.json is not None:
        sys.stderr.flush()
        text = json.dumps(out, indent=1)
        if to_stdout:
            print(text, flush=True)
        else:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
    return out


def _main():
    main()
    return 0


def _cli():
    """``main()``, with a usage error printed once (rank 0) and every rank exiting with 2:
    all ranks reach the same verdict, so they finalise MPI together instead of aborting."""
    try:
        entry(_main)
    except SystemExit as exc:
        if exc.code in (None, 0):
            raise
        if isinstance(exc.code, str):
            if MPI.COMM_WORLD.Get_rank() == 0:
                say(f"python -m mtcoll.train: error: {exc.code}")
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
        raise SystemExit(2) from None


if __name__ == "__main__":
    _cli()
