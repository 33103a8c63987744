"""Where a calibration is cached, and under which key (see :mod:`mtcoll._calibrate`); and the
measured links of a network (``measure_links``, :mod:`mtcoll.comm._links`) beside it, in files of
their own, keyed by the network as the spec names it and by where the ranks run."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path

#: the calibration file's format; part of the key, so a new format probes anew
FORMAT = 2
#: the measured-links file's format; part of its key
LINKS_FORMAT = 1
_OFF = ("off", "none", "0", "false", "no")


def mode():
    """``"on"``, ``"off"`` or ``"refresh"``, from ``MTCOLL_CALIBRATE`` (default on)."""
    raw = os.environ.get("MTCOLL_CALIBRATE", "").strip().lower()
    if raw in _OFF:
        return "off"
    if raw == "refresh":
        return "refresh"
    if raw in ("", "on", "1", "yes", "true"):
        return "on"
    raise ValueError(f"environment variable MTCOLL_CALIBRATE={raw!r} is not one of on, off, "
                     f"refresh")


def cache_dir():
    """``MTCOLL_CACHE_DIR``, else ``$XDG_CACHE_HOME/mtcoll``, else ``~/.cache/mtcoll``."""
    env = os.environ.get("MTCOLL_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "mtcoll"


@functools.lru_cache(maxsize=1)
def engine_id():
    """A hash of the code a call runs through (the executor, the requests and progress, the
    communicator's call path, this package): any change to it, a compiled engine included,
    measures anew."""
    pkg = Path(__file__).resolve().parent.parent  # mtcoll/
    h = hashlib.sha1(_version().encode())
    files = sorted(pkg.glob("*.py")) + sorted(pkg.glob("_*/**/*.py")) \
        + sorted(pkg.glob("execute/**/*.py"))
    for p in files:
        if p.name in ("__main__.py", "_cli.py", "_tuning.py"):
            continue
        try:
            h.update(p.name.encode() + p.read_bytes())
        except OSError:
            pass
    return h.hexdigest()[:16]


def key(nranks, layout, network, wait, segmenting):
    """The facts a calibration is valid for (see the package notes), as a dict."""
    from mpi4py import MPI

    return {"format": FORMAT, "nranks": int(nranks), "hosts": [int(x) for x in layout],
            "mpi_library": " ".join(MPI.Get_library_version().splitlines()[0].split()),
            "mtcoll": _version(), "engine": engine_id(), "network": str(network),
            "wait": str(wait), "segmenting": [int(x) for x in segmenting],
            "machine": [os.cpu_count() or 0, platform.machine()]}


def links_key(nranks, layout, network, where):
    """The facts a link measurement is valid for: the network spec it started from (a spec
    naming other rates is another network), the rank count and host layout, the MPI library,
    the mtcoll version, the machine, and ``where`` (a digest of every rank's host name and
    network namespace, :func:`mtcoll.comm._links.where`: other nodes, or another emulated
    network on the same machine, are other links)."""
    from mpi4py import MPI

    return {"format": LINKS_FORMAT, "what": "links", "nranks": int(nranks),
            "hosts": [int(x) for x in layout],
            "mpi_library": " ".join(MPI.Get_library_version().splitlines()[0].split()),
            "mtcoll": _version(), "network": str(network), "where": str(where),
            "machine": [os.cpu_count() or 0, platform.machine()]}


def links_path(k):
    """The measured-links file of key ``k`` (:func:`links_key`)."""
    digest = hashlib.sha1(json.dumps(k, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"links-{k['nranks']}r-{digest}.json"


def read(path, k):
    """``(data, why not)``: the JSON file at ``path`` when it holds key ``k``; a missing file or
    another key is ``(None, None)``, an unreadable one ``(None, why)``."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return None, f"unreadable {path}: {e}"
    return (data, None) if isinstance(data, dict) and data.get("key") == k else (None, None)


def _version():
    from importlib import metadata

    try:
        return metadata.version("mtcoll")
    except metadata.PackageNotFoundError:
        return "unknown"


def segmenting(comm):
    """``(segment_bytes, max_segments)`` the Comm's executors cut transfers by."""
    from .. import execute

    sleep = comm.wait == "sleep"
    seg = comm.segment_bytes or (execute.SLEEP_SEGMENT_BYTES if sleep else execute.SEGMENT_BYTES)
    nseg = comm.max_segments or (execute.SLEEP_MAX_SEGMENTS if sleep else execute.MAX_SEGMENTS)
    return int(seg), int(nseg)


def cache_path(k):
    """The cache file of key ``k``."""
    digest = hashlib.sha1(json.dumps(k, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"calibration-{k['nranks']}r-{digest}.json"


def host_layout(leaders):
    """Ranks per host, hosts in order of their lowest rank (``host_leaders``' output)."""
    counts = {}
    for lead in leaders:
        counts[lead] = counts.get(lead, 0) + 1
    return [counts[lead] for lead in sorted(counts)]


def lookup(comm):
    """Rank 0: ``("cached", data, path)``, or ``("probe", key, None, path or None, why)``
    when this key has no usable file (or ``MTCOLL_CALIBRATE=refresh``)."""
    seg = segmenting(comm)
    k = key(comm._size, host_layout(comm._leaders), comm.network.spec, comm.wait, seg)
    path, why = None, None
    try:
        path = cache_path(k)
    except (OSError, RuntimeError) as e:  # no home directory, say
        why = f"no cache directory: {e}"
    if path is not None and mode() != "refresh":
        try:
            data = json.loads(path.read_text())
            if data.get("key") == k:
                return ("cached", data, str(path))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            why = f"unreadable {path}: {e}"
    return ("probe", k, None, None if path is None else str(path), why)


def store(path, data):
    """``(saved, why not)``: a read-only or missing directory costs the cache, never the call."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return True, None
    except OSError as e:
        return False, f"{type(e).__name__}: {e}"
