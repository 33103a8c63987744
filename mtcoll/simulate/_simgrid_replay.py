"""Replay one schedule in SimGrid; a standalone script, run by an interpreter that has SimGrid.

Usage: ``python3 _simgrid_replay.py INPUT.json OUTPUT.json``. It imports neither mtcoll nor
numpy, so any Python with SimGrid's bindings runs it (Debian's ``python3-simgrid`` is a module
of the system interpreter only). ``mtcoll.simulate._simgrid`` writes the input and reads the
output; the input format is described there.

The platform: one host per rank in a single Full routing zone; one SimGrid link per directed
link of our topology, with its bandwidth and its latency plus the router delay; one FATPIPE
link per rank with the per-message overhead as latency, first on every route leaving the rank;
for every ordered pair of ranks a transfer uses, an explicit route through those links.
Switches need no SimGrid object: a route lists the links through them. SimGrid's CM02 model
(max-min sharing, no correction factors) with cross traffic off.

One actor per rank; every transfer has its own mailbox. Step mode: in each step a rank posts
all its sends and receives of that step (``put_async``/``get_async``), waits for all of them,
then waits at a barrier of all ranks. Dataflow mode: a rank posts every receive at the start,
and each send as soon as the receives it depends on have completed.
"""

import json
import os
import sys


def main(inp, outp):
    import simgrid as sg

    with open(inp) as f:
        job = json.load(f)
    e = sg.Engine(["mtcoll-simgrid", "--cfg=network/model:CM02", "--cfg=network/crosstraffic:0",
                   "--cfg=network/latency-factor:1", "--cfg=network/bandwidth-factor:1",
                   "--cfg=network/weight-S:0", "--cfg=surf/precision:1e-12",
                   "--cfg=network/optim:Full",
                   "--log=root.thres:critical"])
    n = job["nranks"]
    zone = sg.NetZone.create_full_zone("mtcoll")
    hosts = [zone.create_host(f"rank{r}", 1e9) for r in range(n)]
    links = []
    for i, (bw, lat) in enumerate(job["links"]):
        links.append(zone.create_link(f"link{i}", bw).set_latency(lat).seal())
    nic = []
    for r in range(n):
        link = zone.create_link(f"overhead{r}", 1e15).set_latency(job["overhead"])
        link.set_sharing_policy(sg.Link.SharingPolicy.FATPIPE, None)
        nic.append(link.seal())
    for key, route in job["routes"].items():
        s, d = (int(x) for x in key.split(","))
        zone.add_route(hosts[s].netpoint, hosts[d].netpoint, None, None,
                       [sg.LinkInRoute(nic[s])] + [sg.LinkInRoute(links[x]) for x in route], False)
    zone.seal()

    src, dst, size, step = job["src"], job["dst"], job["bytes"], job["step"]
    nt = len(src)
    sends = [[] for _ in range(n)]
    recvs = [[] for _ in range(n)]
    for i in range(nt):
        sends[src[i]].append(i)
        recvs[dst[i]].append(i)
    boxes = [sg.Mailbox.by_name(f"t{i}") for i in range(nt)]
    out = {"time": None}

    if job["mode"] == "step":
        nsteps = job["nsteps"]
        barrier = sg.Barrier(n)
        ends = []

        def rank_actor(r):
            by_step_s = [[] for _ in range(nsteps)]
            by_step_r = [[] for _ in range(nsteps)]
            for i in sends[r]:
                by_step_s[step[i]].append(i)
            for i in recvs[r]:
                by_step_r[step[i]].append(i)
            for k in range(nsteps):
                comms = [boxes[i].put_async(i, size[i]) for i in by_step_s[k]]
                # get_async's second value holds the buffer the comm writes into: keep it alive
                gets = [boxes[i].get_async() for i in by_step_r[k]]
                comms += [c for c, _ in gets]
                if comms:
                    sg.Comm.wait_all(comms)
                del gets
                barrier.wait()
                if r == 0:
                    ends.append(sg.Engine.clock)

        for r in range(n):
            sg.Actor.create(f"rank{r}", hosts[r], rank_actor, r)
        e.run()
        out["step_ends"] = ends
        out["time"] = ends[-1] if ends else 0.0
    else:
        deps = job["deps"]  # per transfer: the transfers (receives of its sender) it waits for
        waiters = [[] for _ in range(nt)]
        for i in range(nt):
            for j in deps[i]:
                waiters[j].append(i)
        finish = [0.0] * nt

        def rank_actor(r):
            missing = {i: len(deps[i]) for i in sends[r]}
            pending, what, keep = [], [], []
            for i in recvs[r]:
                comm, data = boxes[i].get_async()
                pending.append(comm)
                keep.append(data)  # the receive buffer: must outlive the comm
                what.append(i)
            for i in sends[r]:
                if missing[i] == 0:
                    pending.append(boxes[i].put_async(i, size[i]))
                    what.append(-1 - i)
            while pending:
                k = sg.Comm.wait_any(pending)
                i = what[k]
                pending[k], what[k] = pending[-1], what[-1]
                pending.pop()
                what.pop()
                if i < 0:
                    continue
                finish[i] = sg.Engine.clock
                for w in waiters[i]:
                    missing[w] -= 1
                    if missing[w] == 0:
                        pending.append(boxes[w].put_async(w, size[w]))
                        what.append(-1 - w)

        for r in range(n):
            sg.Actor.create(f"rank{r}", hosts[r], rank_actor, r)
        e.run()
        out["time"] = max(finish) if finish else 0.0
        out["finish"] = finish
    out["simgrid_version"] = ".".join(str(x) for x in sg.simgrid_version) \
        if isinstance(getattr(sg, "simgrid_version", None), (tuple, list)) else str(
            getattr(sg, "simgrid_version", "?"))
    with open(outp, "w") as f:
        json.dump(out, f)
    sys.stdout.flush()
    sys.stderr.flush()
    # SimGrid 3.32's thread contexts can abort in interpreter shutdown after a clean run
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
