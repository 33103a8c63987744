"""Per-rank facts of each algorithm's schedule on tori of growing side: steps per phase,
messages a rank sends per call, bytes per message (share of the buffer), and the bytes of one
rank's part (``RankSchedule.to_bytes``, what the communicator scatters to it).

    python bench/scale_facts.py [--sides 4 8 16 32] [--algorithms multitree,ring,ring2d,rhd]
        [--json FILE]

Rank 0's part is measured (ranks of a torus are alike for multitree, ring and ring2d).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from mtcoll.plan import plan, rank_parts


def facts(spec, algorithm):
    s = plan(spec, algorithm)
    part = next(iter(rank_parts(spec, algorithm)))
    mine = part.src == 0
    width = (part.hi[mine] - part.lo[mine]).astype(np.int64)
    sends = np.bincount(s.src, minlength=s.nranks)
    return {"topology": spec, "nodes": s.nranks, "algorithm": algorithm,
            "steps_per_phase": list(s.steps),
            "messages_per_rank": [int(sends.min()), int(sends.max())],
            "share_per_message": [float(width.min()) / s.nchunks,
                                  float(width.max()) / s.nchunks],
            "part_bytes": len(part.to_bytes()), "transfers": s.ntransfers}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--algorithms", default="multitree,ring,ring2d,rhd")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rows = []
    for side in a.sides:
        for alg in a.algorithms.split(","):
            r = facts(f"torus:{side}x{side}", alg)
            rows.append(r)
            print(f"{r['topology']:>13} {alg:>9} steps {r['steps_per_phase']} messages/rank "
                  f"{r['messages_per_rank']} share/message {r['share_per_message'][0]:.5f}.."
                  f"{r['share_per_message'][1]:.5f} part {r['part_bytes']} B", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": {"tool": "bench/scale_facts.py", "argv": sys.argv[1:]},
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
