"""The tuning table that ``algorithm="auto"`` consults: measured crossovers per (ranks, topology).

``python -m mtcoll.bench --tune [FILE]`` writes it; :class:`mtcoll.Comm` reads it once, at
construction, on rank 0, and broadcasts the part for its own rank count and topology, so every
rank chooses from the same table (ranks choosing differently would deadlock).

Where it is read
----------------
``MTCOLL_TUNING=FILE``      that file (it must exist);
``MTCOLL_TUNING=off``       no table (also ``none``, ``0``, ``false``);
unset or empty              ``$XDG_CACHE_HOME/mtcoll/tuning.json`` (default
                            ``~/.cache/mtcoll/tuning.json``) if that file exists.

Format (JSON)::

    {"mtcoll_tuning": 1,
     "tables": [
       {"nranks": 8, "topology": "torus:2x4",
        "rules": [{"max_bytes": 49152, "algorithm": "native"},
                  {"max_bytes": null, "algorithm": "multitree"}],
        "measured": {...free-form facts: date, MPI library, dtype, op, sizes...}}]}

A table applies to a communicator of exactly ``nranks`` ranks whose topology spec is
``topology``. Its rules are read in order: the first whose ``max_bytes`` is null or at least the
call's byte count gives the algorithm. A call that no table matches falls back to the built-in
rule of :func:`mtcoll.comm.choose`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["FORMAT", "default_path", "resolve_path", "load", "lookup", "rules_from_winners",
           "merge", "dump"]

FORMAT = 1
_OFF = ("off", "none", "0", "false", "no")
_SPECIAL = ("native",)


def default_path():
    """``$XDG_CACHE_HOME/mtcoll/tuning.json``, or ``~/.cache/mtcoll/tuning.json``."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    root = Path(base) if base else Path.home() / ".cache"
    return root / "mtcoll" / "tuning.json"


def resolve_path():
    """The tuning file to read, as ``(path, required)``; ``(None, False)`` for none.

    ``required`` is True when ``MTCOLL_TUNING`` names the file (a missing file is then an
    error); the default file is read only if it exists.
    """
    raw = os.environ.get("MTCOLL_TUNING", "").strip()
    if raw.lower() in _OFF:
        return None, False
    if raw:
        return Path(raw).expanduser(), True
    return default_path(), False


def _bad(path, why):
    return ValueError(f"tuning file {path}: {why}")


def load(path, algorithms=None):
    """Read and check a tuning file.

    Parameters
    ----------
    path : str or Path
    algorithms : iterable of str, optional
        Algorithm names a rule may give besides ``"native"`` (default: anything).

    Returns
    -------
    dict
        ``{(nranks, topology): ((max_bytes or None, algorithm), ...)}``.

    Raises
    ------
    ValueError
        Naming the file: unreadable, not JSON, or not in the format above.
    """
    path = Path(path)
    return _check(_read(path), path, algorithms)


def _read(path):
    try:
        text = path.read_text()
    except OSError as e:
        raise _bad(path, f"cannot read it ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(path, f"not valid JSON ({e})") from None


def _check(doc, path, algorithms):
    if not isinstance(doc, dict) or doc.get("mtcoll_tuning") != FORMAT:
        raise _bad(path, f'expected an object with "mtcoll_tuning": {FORMAT}')
    tables = doc.get("tables")
    if not isinstance(tables, list):
        raise _bad(path, '"tables" must be a list')
    allowed = None if algorithms is None else set(algorithms) | set(_SPECIAL)
    out = {}
    for i, t in enumerate(tables):
        where = f"tables[{i}]"
        if not isinstance(t, dict):
            raise _bad(path, f"{where} must be an object")
        n, topo, rules = t.get("nranks"), t.get("topology"), t.get("rules")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise _bad(path, f"{where}.nranks must be a positive integer, got {n!r}")
        if not isinstance(topo, str) or not topo:
            raise _bad(path, f"{where}.topology must be a topology spec, got {topo!r}")
        if not isinstance(rules, list) or not rules:
            raise _bad(path, f"{where}.rules must be a non-empty list")
        parsed, last = [], -1
        for j, r in enumerate(rules):
            rw = f"{where}.rules[{j}]"
            if not isinstance(r, dict):
                raise _bad(path, f"{rw} must be an object")
            mb, algo = r.get("max_bytes"), r.get("algorithm")
            if mb is not None and (not isinstance(mb, int) or isinstance(mb, bool) or mb < 0):
                raise _bad(path, f"{rw}.max_bytes must be a byte count or null, got {mb!r}")
            if not isinstance(algo, str) or (allowed is not None and algo not in allowed):
                what = "" if allowed is None else f"; one of {', '.join(sorted(allowed))}"
                raise _bad(path, f"{rw}.algorithm {algo!r} is not an algorithm{what}")
            if last is None or (mb is not None and mb <= last):
                raise _bad(path, f"{rw}: max_bytes must increase, and only the last may be null")
            last = mb
            parsed.append((mb, algo))
        key = (n, topo.strip().lower())
        if key in out:
            raise _bad(path, f"{where}: a second table for {n} ranks on {topo!r}")
        out[key] = tuple(parsed)
    return out


def lookup(table, nbytes, nranks, topology):
    """The algorithm ``table`` (from :func:`load`) gives for a call, or None if none applies."""
    if not table:
        return None
    rules = table.get((int(nranks), str(topology).strip().lower()))
    if rules is None:
        return None
    for max_bytes, algo in rules:
        if max_bytes is None or nbytes <= max_bytes:
            return algo
    return None


def rules_from_winners(winners):
    """Rules from ``[(bytes, algorithm), ...]`` measured winners (sorted by size).

    A measured size stands for the sizes up to the geometric middle between it and the next
    measured size; the last one for everything above. Neighbours with the same winner merge.
    """
    winners = sorted(winners)
    rules = []
    for i, (size, algo) in enumerate(winners):
        if i + 1 < len(winners):
            bound = int((size * winners[i + 1][0]) ** 0.5)
        else:
            bound = None
        if rules and rules[-1]["algorithm"] == algo:
            rules[-1]["max_bytes"] = bound
        else:
            rules.append({"max_bytes": bound, "algorithm": algo})
    return rules


def merge(path, table):
    """Add ``table`` (one entry of ``"tables"``) to the tuning file at ``path``, replacing the
    entry for the same ranks and topology; creates the file (and its directory) if needed.
    An existing file that is not a tuning file raises ValueError naming it."""
    path = Path(path)
    doc = {"mtcoll_tuning": FORMAT, "tables": []}
    if path.exists() and path.stat().st_size:
        doc = _read(path)
        _check(doc, path, None)
    key = (table["nranks"], table["topology"].strip().lower())
    doc["tables"] = [t for t in doc["tables"]
                     if (t["nranks"], t["topology"].strip().lower()) != key] + [table]
    doc["tables"].sort(key=lambda t: (t["nranks"], t["topology"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump(doc))
    os.replace(tmp, path)
    return doc


def dump(doc):
    """JSON text of a tuning document, one rule per line."""
    return json.dumps(doc, indent=1) + "\n"
