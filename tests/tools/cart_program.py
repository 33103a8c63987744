"""A plain mpi4py program on a Cartesian grid with row and column sub-communicators (no mtcoll
in it): tests/tools/test_run.py runs it with ``python -m mtcoll.run``.

Every call has its own element count, so that the ``MTCOLL_DEBUG`` lines say which
communicator each came from: the world's Allreduce 7, the grid's 11, a row's Allgather
13 per rank, a column's Reduce_scatter_block 17 per rank, a Split's Allreduce 19. Each rank
checks its results against what they must be and prints one line; any mismatch raises.
"""

from mpi4py import MPI
import numpy as np

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()


def allreduce_of_ranks(comm, count):
    x = np.full(count, comm.Get_rank() + 1.0)
    out = np.empty(count)
    comm.Allreduce(x, out, op=MPI.SUM)
    n = comm.Get_size()
    assert np.all(out == n * (n + 1) / 2), (comm.Get_size(), out[:3])


allreduce_of_ranks(world, 7)

dims = MPI.Compute_dims(size, 2)
grid = world.Create_cart(dims, periods=[True, True])
allreduce_of_ranks(grid, 11)
row_of, col_of = grid.Get_coords(grid.Get_rank())

rows = grid.Sub([False, True])  # the ranks of one grid row
cols = grid.Sub([True, False])  # the ranks of one grid column

mine = np.full(13, float(grid.Get_rank()))
gathered = np.empty(13 * rows.Get_size())
rows.Allgather(mine, gathered)
members = [grid.Get_cart_rank([row_of, c]) for c in range(dims[1])]
assert np.array_equal(gathered, np.repeat(np.array(members, float), 13)), gathered

blocks = np.arange(17 * cols.Get_size(), dtype=np.float64) + grid.Get_rank()
block = np.empty(17)
cols.Reduce_scatter_block(blocks, block, op=MPI.SUM)
owners = sum(grid.Get_cart_rank([r, col_of]) for r in range(dims[0]))
mine_at = cols.Get_rank() * 17
expected = dims[0] * np.arange(mine_at, mine_at + 17, dtype=np.float64) + owners
assert np.array_equal(block, expected), (block, expected)

half = world.Split(rank % 2, rank)
allreduce_of_ranks(half, 19)

for comm in (half, cols, rows, grid):
    comm.Free()
print(f"cart_program: rank {rank} of {size} ok on a {dims[0]}x{dims[1]} grid")
