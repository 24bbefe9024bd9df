"""drefine: distributed, array-parallel refinement of atomic models against X-ray data and cryo-EM maps."""

import os as _os

# BLAS runs single-threaded unless the user says otherwise (this takes effect when drefine is
# imported before numpy, as the command line does): drefine's parallelism comes from numba,
# scipy.fft and dask workers, and a multi-threaded BLAS would both oversubscribe the cores and
# change the rounding of L-BFGS's long dot products, so that the same job run in-process and on
# dask workers (which pin BLAS to one thread) would differ in the last digits.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")

__version__ = "0.1.0"
