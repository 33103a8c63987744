"""The compiled engine's interface with its kernel: the codes and array slots both sides read.

``_engine.py`` (Python) fills the arrays and reads the kernel's return code; ``_kernel.py``
(numba) indexes the same slots. Neither imports the other for these.
"""

import numpy as np

# the kernel's op codes, by the ufunc mtcoll._ops maps each MPI op to
OPS = {np.add: 1, np.multiply: 2, np.minimum: 3, np.maximum: 4, np.logical_and: 5,
       np.logical_or: 6, np.logical_xor: 7, np.bitwise_and: 8, np.bitwise_or: 9,
       np.bitwise_xor: 10}
# the element types the kernel reduces, by (kind, itemsize): its dtype codes
DTYPE_CODES = {("b", 1): 0, ("i", 1): 1, ("i", 2): 2, ("i", 4): 3, ("i", 8): 4, ("u", 1): 5,
               ("u", 2): 6, ("u", 4): 7, ("u", 8): 8, ("f", 4): 9, ("f", 8): 10, ("c", 8): 11,
               ("c", 16): 12}

# return codes of the kernel
DONE, IDLE, ERROR, STALL = 0, 1, 2, 3
# slots of the state array (one per call: what the kernel leaves for the next entry)
S_REMAINING, S_NEXT_RECV, S_RECVS_OUT, S_NACTIVE, S_WHEAD, S_WTAIL, S_MOVED, S_ERR = range(8)
STATE_SLOTS = 8
# slots of the pace array: how the kernel waits between tests (see _kernel.run)
P_POLLS, P_SPIN, P_YIELDS, P_SLEEP_MIN, P_SLEEP_MAX, P_BUDGET, P_SLACK = range(7)
PACE_SLOTS = 7
