"""Where tasks run: a local dask.distributed cluster by default, an existing one by address,
or in-process for small jobs and tests.

Local workers are processes (gemmi holds the GIL) with one thread each, and numba/BLAS
threads pinned to one per worker so that workers × threads never exceeds the cores.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

from ..errors import DrefineError

IN_PROCESS = ("inprocess", "in-process", "sync", "none")
#: dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (memory handed back to the OS at
#: once, for long-lived workers holding data). That also fixes glibc's mmap threshold, so every
#: array over 128 KiB (a member's map grids, many per evaluation) is mapped and faulted in anew:
#: measured 40 ms of system time per 4hg7 member, and the 32-member ensemble 10 % slower. Our
#: tasks are whole refinements whose memory is freed when they end: glibc's own (dynamic)
#: thresholds suit them. This environment variable (dask config) unsets it for workers started
#: elsewhere (batch jobs here; deploy/ for containers and `dask worker`).
KEEP_MALLOC_DEFAULTS = ("DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON", "{'MALLOC_TRIM_THRESHOLD_': None}")
#: dask workers sample the running task's stack every 10 ms for the dashboard's profile page; in a
#: task that is mostly Python around numba kernels each sample takes the GIL from it. Measured
#: (interleaved A/B): the 5fuu weight scan on one worker 1.35 → 1.19 s, the 32-member 4hg7
#: ensemble's batch 5.97 → 5.49 s. drefine's tasks are whole refinements nobody profiles there.
NO_WORKER_PROFILER = ("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "False")
#: the dask config both settings stand for, for clusters started here
WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                 "distributed.worker.profile.enabled": False}
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def pin_threads(n: int = 1) -> None:
    """Pin numba and BLAS threads of this process (run on each worker at start-up)."""
    for v in _THREAD_VARS:
        os.environ[v] = str(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except (ImportError, ValueError):
        pass


@contextlib.contextmanager
def task_client(scheduler: str | None = None, workers: int | None = None):
    """Yield a dask.distributed Client, or None for in-process execution.

    scheduler: None → a local cluster (started and stopped here); 'inprocess' → None;
    'tcp://HOST:PORT' (or any address) → connect to that running scheduler.
    """
    if scheduler is not None and scheduler.lower() in IN_PROCESS:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise DrefineError(f"cannot reach the dask scheduler at {scheduler}: {e}") from None
        try:
            yield client
        finally:
            client.close()
        return
    import dask

    n = workers or default_workers()
    env = {v: "1" for v in _THREAD_VARS}
    # glibc's own malloc thresholds and no stack sampler in the workers (KEEP_MALLOC_DEFAULTS,
    # NO_WORKER_PROFILER); each nanny reads the settings once, when it is made, and passes them
    # to the workers it starts and restarts
    with dask.config.set(WORKER_CONFIG):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=40, env=env)
    with cluster, Client(cluster) as client:
        yield client


def gather_results(client, futures: list) -> list:
    """The futures' results in order, as `client.gather` gives them, but clean on Ctrl-C: a
    gather interrupted while tasks run leaves distributed's per-future waiters to fail as the
    client closes, and asyncio prints one "Task exception was never retrieved … AllExit"
    traceback per future (hundreds in a crossing search round). Waiting first and cancelling the
    futures on the interrupt prints none; a task's own error is raised by the gather as before."""
    from distributed import wait

    try:
        wait(futures)
    except KeyboardInterrupt:
        client.cancel(futures)
        raise
    return client.gather(futures)


class _PendingClient:
    """A Client still starting in a background thread: any use of it waits for the start (and
    raises what the start raised, e.g. an unreachable scheduler)."""

    def __init__(self, future):
        self._future = future

    def __getattr__(self, name):
        return getattr(self._future.result(), name)


class BackgroundClient:
    """A `task_client` or `batch_client` context started and closed in a background thread.

    `with BackgroundClient(ctx) as client:` yields at once a stand-in for the Client, so that
    reading the inputs and the first work here overlap the workers' start (about 1.5 s for a
    local cluster of two). Leaving the block normally starts the close (about 0.5 s) and returns:
    the caller writes its reports meanwhile and calls `wait_closed()` at the end. Leaving on an
    exception closes at once. `ctx` None: no cluster, the client is None (in-process runs).
    """

    def __init__(self, context):
        self._context = context
        # entered and left in one thread: the Client keeps its "current client" in a context
        # variable, which must be reset in the context that set it
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="drefine-cluster")
        self._started = None
        self._closing = None

    def __enter__(self):
        if self._context is None:
            return None
        # distributed imported here, before the start thread: imported there it competed for the
        # GIL with this thread's work (reading inputs, restraints) and took about 0.7 s instead of
        # 0.3, which delayed the workers' spawn by as much (ensemble command, measured A/B)
        import distributed  # noqa: F401

        self._started = self._pool.submit(self._context.__enter__)
        return _PendingClient(self._started)

    def __exit__(self, *exc):
        if self._started is None:
            return False
        if exc[0] is None:
            self._started.result()
            self._closing = self._pool.submit(self._context.__exit__, None, None, None)
            return False
        try:
            self._started.result()
        except BaseException:  # noqa: BLE001 - the start failed too: the block's problem is reported
            self._pool.shutdown()
            return False
        suppressed = self._pool.submit(self._context.__exit__, *exc).result()
        self._pool.shutdown()
        return suppressed

    def wait_closed(self) -> None:
        """Wait for the close started on leaving the block (raises what the close raised)."""
        try:
            if self._closing is not None:
                self._closing.result()
        finally:
            self._pool.shutdown()


def batch_job_prologue() -> list[str]:
    """Shell lines run before a batch job's workers start: one thread per worker process,
    glibc's malloc thresholds kept (KEEP_MALLOC_DEFAULTS) and no stack sampler (NO_WORKER_PROFILER)."""
    return [f"export {v}=1" for v in _THREAD_VARS] + ['export {}="{}"'.format(*setting) for setting in
                                                     (KEEP_MALLOC_DEFAULTS, NO_WORKER_PROFILER)]


@contextlib.contextmanager
def batch_client(kind: str, jobs: int, cores: int = 2, memory: str = "8GB", walltime: str = "02:00:00",
                 queue: str | None = None, account: str | None = None):
    """A Client on workers started as batch jobs (SLURM or PBS) through dask-jobqueue: `jobs`
    jobs of `cores` single-threaded worker processes each (numba/BLAS pinned to one thread)."""
    try:
        import dask_jobqueue
    except ImportError:
        raise DrefineError("--cluster needs dask-jobqueue: pip install 'drefine[hpc]'") from None
    from distributed import Client

    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}.get(kind)
    if cls is None:
        raise DrefineError(f"unknown --cluster {kind!r} (slurm or pbs)")
    cluster = cls(cores=cores, processes=cores, memory=memory, walltime=walltime, queue=queue, account=account,
                  job_script_prologue=batch_job_prologue())
    cluster.scale(jobs=jobs)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()
