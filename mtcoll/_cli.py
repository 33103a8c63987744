"""What every ``python -m mtcoll.<tool>`` shares: the ``--json [FILE]`` convention, and
matplotlib as an optional extra (:func:`pyplot`).

``--json`` with no FILE, or ``-``, prints one JSON object on stdout *instead of* the table;
``--json FILE`` writes the object to FILE and still prints the table.
"""

from __future__ import annotations

import json


def add_json_option(parser):
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="write one JSON object to FILE (no FILE or '-': to stdout, "
                             "instead of the table)")


def report(obj, json_dest, table):
    """Print ``table()`` and/or write ``obj`` as JSON, as ``--json`` asked."""
    if json_dest is not None:
        text = json.dumps(obj, indent=2)
        if json_dest == "-":
            print(text)
            return
        with open(json_dest, "w") as f:
            f.write(text + "\n")
    table()


def pyplot(what):
    """``matplotlib.pyplot`` on the non-interactive Agg backend; RuntimeError naming ``what``
    (the option or output that wanted it) and the ``plot`` extra when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(f"{what} needs matplotlib: pip install 'mtcoll[plot]'") from None
    return plt
