"""The executor's limits and waiting settings: read at call time by both engines and by the
communicator, so a test (or a user tuning a run) sets them here, on this module.

``mtcoll.execute.SEGMENT_BYTES`` and the rest read the same values (see
``mtcoll/execute/__init__.py``).
"""

#: No MPI message carries more elements than this, whatever the segment settings: counts stay
#: far below 2**31 so that the plain (not large-count) MPI calls always suffice. Lower it in
#: tests to exercise the splitting.
MAX_MESSAGE_ELEMENTS = 2**30

#: Default target size of one message (one piece of a transfer), in bytes.
SEGMENT_BYTES = 256 * 1024

#: Default maximum number of pieces a transfer is cut into for pipelining (the message size
#: limit may still cut it into more).
MAX_SEGMENTS = 16

#: The defaults when the executor sleeps while waiting (``wait="sleep"``, more ranks than
#: cores): fewer, larger messages. Pipelining buys nothing when the ranks share a few cores,
#: and every message costs the receiver and the sender a turn on a core.
SLEEP_SEGMENT_BYTES = 1024 * 1024
SLEEP_MAX_SEGMENTS = 4

#: Reduce-phase receives posted ahead of need, per execution.
RECV_WINDOW = 64

#: Calls in flight at once on one communicator that are told apart by their tags.
TAG_SLOTS = 64

#: How a blocking wait waits, unless an :class:`Executor` says otherwise: ``"busy"`` blocks in
#: ``MPI.Request.Waitsome`` (the MPI library polls, keeping its core busy); ``"sleep"`` tests
#: (``Testsome``) :data:`SPIN_POLLS` times, then :data:`YIELD_POLLS` times with a
#: ``sched_yield`` before each, then sleeps between tests, from :data:`SLEEP_MIN` seconds
#: doubling up to :data:`SLEEP_MAX`. Sleeping gives the core to the ranks that have work, which
#: is what counts when there are more ranks than cores (measured in docs/performance.md: 8 ranks
#: on 2 cores, an 8-byte MultiTree allreduce takes 33 ms polling and 1 ms sleeping); it adds up
#: to ``SLEEP_MAX`` (plus the kernel's timer slack) of latency to a wait.
WAIT = "busy"
SPIN_POLLS = 2
YIELD_POLLS = 0
SLEEP_MIN = 20e-6
SLEEP_MAX = 200e-6

#: Bytes of scratch buffers kept for reuse between calls, over all executors of the process
#: (the most recently returned buffer is kept even when it alone is larger).
SCRATCH_BUDGET = 16 * 1024 * 1024
