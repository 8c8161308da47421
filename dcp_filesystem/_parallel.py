"""The one way this package spreads work over threads, and the work it spreads: file I/O and CRC-32.

``run_in_threads`` runs tasks on threads of their own and always hands their
errors to the caller; the rest decides how many threads a job is worth, under
one budget of cores, and does large positional reads and CRC-32s in parts
(os.preadv and zlib.crc32 release the GIL).

The budget is this process's share of its node: of the C CPUs in its affinity
(``os.sched_getaffinity``: taskset, numactl, cgroup cpusets; ``os.cpu_count()``
where the platform has no affinity) and the N CPUs of the machine
(``os.cpu_count()``), shared by the L ranks on the node (``LOCAL_WORLD_SIZE``,
as torchrun sets it), it is ``max(1, min(C, N // L))``: at most its affinity
and at most its 1/L of the machine. Ranks pinned by the launcher to sets of
their own (C * L <= N) keep their whole set; ranks that share the machine
divide it; ranks bound L/k to each of k NUMA nodes get N/L each. Ranks that all
share one set smaller than the machine (a container's cpuset, which
``os.cpu_count()`` does not see) cannot be told apart from those and take up
to N/L each. ``LOCAL_WORLD_SIZE`` unset means L = 1; a value that is not a
positive integer is warned about and taken as 1. The budget is worked out on
first use in each process, the first load (a forked child works it out
again): affinity the process sets itself after that is not seen.
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from typing import IO, Callable, Iterable, List, Optional, Sequence, Tuple, TypeVar

from ._crc import crc32 as _crc32
from ._crc import crc32_blocks, crc32_combine
from .fs import file_descriptor

T = TypeVar("T")

_STEP_BYTES = 4 << 20  # one read call per step
# With a CRC, smaller steps: each is checksummed while its bytes are still in the core's cache (256 KiB
# measured fastest here: 4 MiB steps cost a third more CRC time, 64 KiB ones more switching).
_CRC_STEP_BYTES = 256 << 10
_PART_BYTES = 8 << 20  # smaller ranges are not worth a thread
# Below this many bytes per thread, files are read or written one after another: the work on
# small items holds the GIL, so extra threads only add switching.
_BYTES_PER_THREAD = 16 << 20


def run_in_threads(tasks: Sequence[Callable[[], T]], name: str, stop: Optional[Callable[[], None]] = None) -> List[T]:
    """Each task's result, in order: the first task runs in the calling thread, the others on
    threads of their own. All are waited for; then the first error, in task order, is raised.

    ``stop`` is called when a task fails, or when the wait is interrupted (Ctrl-C), to make the
    others finish early; the interrupted wait goes on until they have, then raises."""
    results: List[Optional[T]] = [None] * len(tasks)
    errors: List[Optional[BaseException]] = [None] * len(tasks)

    def run(i: int) -> None:
        try:
            results[i] = tasks[i]()
        except BaseException as e:  # noqa: B036 - re-raised in the calling thread
            errors[i] = e
            if stop is not None:
                stop()

    threads = [threading.Thread(target=run, args=(i,), name=f"{__package__}-{name}-{i}") for i in range(1, len(tasks))]
    interrupted: Optional[BaseException] = None
    try:
        # Inside the try: Ctrl-C can land in start(), and the threads started by then still use the
        # caller's buffers (views of tensors the caller frees as the error unwinds).
        for thread in threads:
            thread.start()
        if tasks:
            run(0)
    except BaseException:  # noqa: B036 - from start() (run catches its own): the started threads stop early
        if stop is not None:
            stop()
        raise
    finally:
        for thread in threads:
            while thread.is_alive():
                try:
                    thread.join()
                except BaseException as e:  # noqa: B036 - raised once every thread has finished
                    interrupted = interrupted or e
                    if stop is not None:
                        stop()
    if interrupted is not None:
        raise interrupted
    for error in errors:
        if error is not None:
            raise error
    return results  # type: ignore[return-value]


def for_each(items: Iterable[T], work: Callable[[T], None], threads: int, name: str) -> None:
    """``work(item)`` for every item on ``threads`` threads; after an error no new item is started."""
    pending = iter(items)
    lock = threading.Lock()
    failed = threading.Event()

    def drain() -> None:
        while not failed.is_set():
            with lock:
                item = next(pending, _DONE)
            if item is _DONE:
                return
            work(item)  # type: ignore[arg-type]

    run_in_threads([drain] * max(1, threads), name, stop=failed.set)


_DONE = object()


def worker_count(thread_count: int, files: int, nbytes: int) -> int:
    """Threads worth using for ``files`` files holding ``nbytes`` bytes, at most ``thread_count``."""
    return max(1, min(thread_count, files, nbytes // _BYTES_PER_THREAD))


def _core_budget() -> int:
    """This process's share of its node's cores, by the rule in this module's docstring."""
    machine = os.cpu_count() or 1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else machine
    ranks, setting = 1, os.environ.get("LOCAL_WORLD_SIZE")
    if setting is not None:
        try:
            ranks = int(setting)
        except ValueError:
            ranks = 0
        if ranks < 1:
            ranks = 1
            warnings.warn(
                f"LOCAL_WORLD_SIZE={setting!r} is not a positive integer: {__package__} takes this process for "
                f"the only rank on its node, with all {affinity} CPUs of its affinity",
                stacklevel=2,
            )
    return max(1, min(affinity, machine // ranks))


_budget = (0, 0)  # (the process it was worked out in, the budget)


def _cores() -> int:
    global _budget
    pid = os.getpid()  # a forked child (set to other CPUs, say) works its budget out again
    if _budget[0] != pid:
        _budget = (pid, _core_budget())
    return _budget[1]


def share_of_cores(sharing: int) -> int:
    """The cores one of ``sharing`` jobs running at once may use (at least one), of this process's budget."""
    return max(1, _cores() // max(sharing, 1))


def _parts(size: int, sharing: int) -> List[Tuple[int, int]]:
    """[start, end) parts of a ``size``-byte range, one per core of this job's share of the cores."""
    count = max(1, min(share_of_cores(sharing), size // _PART_BYTES))
    step = -(-size // count) if size else 0
    return [(start, min(start + step, size)) for start in range(0, size, step)] if step else [(0, 0)]


def crc32_on_cores(data: memoryview, sharing: int = 1) -> int:
    """The CRC-32 of ``data``, in parts on this job's share of the cores (``sharing`` such jobs at once) for
    large buffers. Not a running CRC: for that, ``_crc.crc32(data, value)``."""
    if len(data) < 2 * _PART_BYTES:
        return _crc32(data)
    parts = _parts(len(data), sharing)
    if len(parts) == 1:
        return _crc32(data)
    crcs = run_in_threads([functools.partial(_crc32, data[start:end]) for start, end in parts], "crc32")
    result = crcs[0]
    for (start, end), crc in zip(parts[1:], crcs[1:]):
        result = crc32_combine(result, crc, end - start)
    return result


def write_with_crc(stream: IO[bytes], data: memoryview, block_bytes: int) -> Tuple[int, bytes]:
    """Write ``data`` while its CRC-32s are computed on another thread: ``_crc.crc32_blocks``."""
    crcs, _ = run_in_threads(
        [functools.partial(crc32_blocks, data, block_bytes), functools.partial(stream.write, data)], "crc32"
    )
    return crcs


def preadv_descriptor(stream: IO[bytes]) -> Optional[int]:
    """The OS file descriptor behind ``stream``, where positional reads can use it."""
    return file_descriptor(stream) if hasattr(os, "preadv") else None


def _pread_range(fd: int, offset: int, view: memoryview, with_crc: bool) -> Tuple[int, int]:
    """Fill ``view`` from ``fd`` at ``offset`` in steps, each checksummed right after it is read."""
    position, crc = 0, 0
    step_bytes = _CRC_STEP_BYTES if with_crc else _STEP_BYTES
    while position < len(view):
        step = view[position : position + step_bytes]
        n = os.preadv(fd, [step], offset + position)
        if n <= 0:
            break
        if with_crc:
            crc = _crc32(step[:n], crc)
        position += n
    return position, crc


def pread_into(fd: int, offset: int, view: memoryview, with_crc: bool, sharing: int = 1) -> Tuple[int, int]:
    """Fill ``view`` from ``fd`` at ``offset``: (bytes read, their zlib CRC-32 or 0 if not ``with_crc``).

    The range is split over this job's share of the cores (``sharing`` such reads
    running at once); each part is read in steps, each step checksummed right
    after it is read, and the parts' CRCs are joined with crc32_combine. Fewer
    bytes than ``len(view)`` means the file ended first.
    """
    parts = _parts(len(view), sharing)
    done = run_in_threads(
        [functools.partial(_pread_range, fd, offset + start, view[start:end], with_crc) for start, end in parts],
        "pread",
    )
    total, crc = 0, 0
    for (start, end), (got, part_crc) in zip(parts, done):
        crc = crc32_combine(crc, part_crc, got) if start else part_crc
        total += got
        if got != end - start:
            break  # a short part: the bytes after it are not this range's
    return total, crc
