"""The validator's error kinds: one code each, shared by the Python validator (``_validate.py``)
and its numba twin (``_kernels.py``), which count and report errors by these codes."""

E_LINK, E_SEND_PORTS, E_RECV_PORTS, E_EARLY_REDUCE, E_EARLY_GATHER, E_OWNER, E_MISSING = range(7)
NKINDS = 7
