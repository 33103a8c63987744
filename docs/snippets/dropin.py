from mpi4py import MPI
import numpy as np
import mtcoll

comm = mtcoll.Comm(MPI.COMM_WORLD)                # was: comm = MPI.COMM_WORLD
grad = np.full(1_000_000, comm.Get_rank(), dtype=np.float32)
comm.Allreduce(MPI.IN_PLACE, grad, op=MPI.SUM)    # the same call as with mpi4py
print(f"rank {comm.Get_rank()}: {grad[0]} on {comm.network.spec}")
