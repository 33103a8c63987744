"""Run a command on a built testbed: ``mpiexec -n N <wrapper> command...``, every rank entering
its namespace through the wrapper, with the MPI library told to use TCP.

The wrapper is ``exec ip netns exec <namespace of $PMI_RANK> "$@"``: the ordinary ``mpiexec``
starts the ranks in the root namespace, the PMI connection is an inherited descriptor and
survives the switch, and MPICH's ``ch4:ofi`` netmod with OFI's tcp provider then talks over the
namespace's veths (``MPIR_CVAR_NOLOCAL=1`` keeps it off shared memory).

With several ranks per namespace (``hier:HxR``) mpiexec is given H made-up hosts and, as its
``ssh``, a script that runs hydra's proxy for each "host" locally: hydra then tells the ranks
they are on H nodes, so the library uses shared memory within a host and TCP between hosts,
and ``Split_type(COMM_TYPE_SHARED)`` gives H groups. ``MTCOLL_TOPOLOGY`` is left unset for
``hier``, so that mtcoll's ``auto`` finds it through MPI as it would on a cluster; hosts joined
by a torus, mesh or ring (``per-host=R``) get it, since MPI cannot show how hosts are joined.
Elsewhere ``MTCOLL_TOPOLOGY`` is the shaped network's spec, rates included.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["MPI_ENV", "run", "find_mpiexec", "cpu_times"]

#: the environment that makes MPICH talk TCP between the namespaces
MPI_ENV = {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}

_WRAPPER = """#!/bin/sh
# mtcoll.testbed: run this rank in its node's network namespace
if [ -z "${PMI_RANK:-}" ]; then
    echo "mtcoll.testbed: PMI_RANK is not set (launch through mpiexec)" >&2; exit 2
fi
ns=$(printf '%s\\n' $MTCOLL_TESTBED_NAMESPACES | sed -n "$((PMI_RANK + 1))p")
if [ -z "$ns" ]; then
    echo "mtcoll.testbed: no namespace for rank $PMI_RANK" >&2; exit 2
fi
exec ip netns exec "$ns" "$@"
"""

# hydra's "ssh" to a testbed host: run the proxy right here (root namespace, where it reaches
# mpiexec); its ranks enter their host's namespace through the wrapper
_LAUNCHER = """#!/bin/sh
while [ "${1#-}" != "$1" ]; do shift; done
shift
exec sh -c "$*"
"""


def find_mpiexec(given=None):
    """``given``, else the ``mpiexec`` beside this Python (a venv's), else the one on PATH."""
    if given:
        return given
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(here, os.X_OK):
        return here
    found = shutil.which("mpiexec")
    if not found:
        raise FileNotFoundError("no mpiexec found (beside this Python or on PATH); "
                                "give one with --mpiexec")
    return found


def cpu_times():
    """Machine-wide CPU seconds from /proc/stat: dict of user, system, softirq, idle, total."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return {"user": (user + nice) / hz, "system": system / hz, "softirq": (irq + softirq) / hz,
            "idle": (idle + iowait) / hz, "total": sum(fields[:8]) / hz,
            "steal": steal / hz}


def run(lay, command, *, mpiexec=None, env=None, timeout=None, events=(), log=None,
        stdout_to_stderr=False):
    """Run ``command`` (a list) with one rank per rank namespace of ``lay``; return a dict.

    ``events`` is a list of ``(seconds, callable, description)`` run on a timer after the
    start (link failures). ``timeout`` seconds bound the whole run: the job's process group is
    sent SIGTERM, then SIGKILL. Ctrl-C (KeyboardInterrupt) and SIGTERM stop the job the same
    way and are re-raised after it is gone; the caller removes the testbed. With
    ``stdout_to_stderr`` the command's standard output goes to standard error (so that
    ``--json`` alone owns standard output).

    The result: ``returncode`` (None when killed on timeout), ``elapsed_s``, ``timed_out``,
    ``cpu`` (the job's user/system CPU seconds from its rusage, the machine's busy fraction
    and softirq seconds from /proc/stat over the run, and the load averages at the start and
    the end), ``events`` (what fired, when).
    """
    n = lay.topology.nranks
    log = log or (lambda s: None)
    tmp = tempfile.mkdtemp(prefix="mtcoll-testbed-")
    wrapper = os.path.join(tmp, "enter-namespace")
    with open(wrapper, "w") as f:
        f.write(_WRAPPER)
    os.chmod(wrapper, 0o755)
    full_env = dict(os.environ)
    full_env.update(MPI_ENV)
    # "python" anywhere in the command (also after env VAR=...) is this interpreter
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    per_ns = lay.ranks_per_namespace
    if per_ns > 1:
        # several ranks per namespace (hier): one hydra proxy per host, so that the library
        # sees separate nodes (COMM_TYPE_SHARED gives one group per host, shared memory
        # inside, TCP between) and mtcoll's auto detects hier as on a cluster
        del full_env["MPIR_CVAR_NOLOCAL"]
        launcher = os.path.join(tmp, "launch-host")
        with open(launcher, "w") as f:
            f.write(_LAUNCHER)
        os.chmod(launcher, 0o755)
        nhost = n // per_ns
        hosts = ",".join(f"mtcb-host{h}:{per_ns}" for h in range(nhost))
        launch = ["-launcher", "ssh", "-launcher-exec", launcher, "-hosts", hosts]
        if lay.topology.kind != "hier":
            # hosts joined by a torus, mesh or ring (per-host=R): MPI shows the hosts but not
            # how they are joined, so the job is told the network it runs on
            full_env.setdefault("MTCOLL_TOPOLOGY", lay.topology.spec)
    else:
        full_env.setdefault("MTCOLL_TOPOLOGY", lay.topology.spec)
        launch = []
    full_env.update(env or {})
    full_env["MTCOLL_TESTBED_NAMESPACES"] = " ".join(lay.rank_namespaces())
    command = list(command)
    if command and command[0] in ("python", "python3"):
        command[0] = sys.executable  # the testbed's own interpreter, not PATH's
    argv = [find_mpiexec(mpiexec)] + launch + ["-n", str(n), wrapper] + command
    log(f"launching: {shlex.join(argv)}")
    fired = []
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0 = cpu_times()
    load0 = os.getloadavg()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=full_env, start_new_session=True,
                            stdout=sys.stderr if stdout_to_stderr else None)
    timers = []
    for at, fn, what in events:
        def fire(fn=fn, what=what, at=at):
            try:
                fn()
                fired.append({"at_s": round(time.monotonic() - t0, 3),
                              "at_unix": round(time.time(), 3), "what": what})
                log(f"[{time.monotonic() - t0:6.1f} s] {what}")
            except Exception as e:  # noqa: BLE001 -- reported, the run goes on
                fired.append({"at_s": round(time.monotonic() - t0, 3), "what": what,
                              "error": str(e)})
                log(f"{what} failed: {e}")
        t = threading.Timer(at, fire)
        t.daemon = True
        t.start()
        timers.append(t)
    timed_out = False
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            log(f"timeout after {timeout:g} s: stopping the job")
            _stop(proc)
    except BaseException:
        _stop(proc)
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
        for t in timers:
            t.cancel()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - t0
    c1 = cpu_times()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = max(c1["total"] - c0["total"], 1e-9)
    cpu = {
        "job_user_s": round(ru1.ru_utime - ru0.ru_utime, 2),
        "job_system_s": round(ru1.ru_stime - ru0.ru_stime, 2),
        "machine_cores": os.cpu_count(),
        "machine_busy_fraction": round(1 - (c1["idle"] - c0["idle"]) / wall, 3),
        "machine_user_s": round(c1["user"] - c0["user"], 2),
        "machine_system_s": round(c1["system"] - c0["system"], 2),
        "machine_softirq_s": round(c1["softirq"] - c0["softirq"], 2),
        # 1, 5 and 15 minute load averages at the launch and at the end (the job's own
        # ranks count: each spinning rank adds one)
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    return {"returncode": None if timed_out else proc.returncode, "timed_out": timed_out,
            "elapsed_s": round(elapsed, 3), "cpu": cpu, "events": fired, "argv": argv}


class _Interrupted(KeyboardInterrupt):
    pass


def _raise_interrupt(signum, frame):
    raise _Interrupted(f"signal {signum}")


def _stop(proc):
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
