"""Run one function over many cases in worker processes, bounded by cores and free memory.

Workers are started with the spawn method (safe on every platform and with torch loaded), a
progress bar shows the work, `num_processes=1` runs in-process (the sequential fallback), and a
failure is re-raised naming the case it came from.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Sequence, TypeVar

import psutil
from tqdm import tqdm

from samplan.errors import SamplanError

T = TypeVar("T")
R = TypeVar("R")


def default_num_processes(requested: int | None, bytes_per_task: float | None = None, n_tasks: int | None = None) -> int:
    """Worker count: the request, else the cores; always capped by free RAM / bytes_per_task and the task count."""
    n = requested if requested and requested > 0 else (os.cpu_count() or 1)
    if bytes_per_task:
        # keep a quarter of the free memory for the parent and the OS
        fits = int(0.75 * psutil.virtual_memory().available // max(bytes_per_task, 1))
        n = min(n, max(fits, 1))
    if n_tasks is not None:
        n = min(n, max(n_tasks, 1))
    return max(n, 1)


def map_cases(
    fn: Callable[..., R],
    items: Sequence[tuple[str, tuple]],
    num_processes: int,
    desc: str,
    progress: bool = True,
) -> dict[str, R]:
    """Call `fn(*args)` for every `(case_id, args)` item; return `{case_id: result}` in item order.

    Errors are raised as SamplanError naming the case; an out-of-memory kill of a worker is reported
    as such, with the advice to lower -np.
    """
    results: dict[str, R] = {}
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="case", dynamic_ncols=True)
    try:
        if num_processes <= 1 or len(items) <= 1:
            for case, args in items:
                results[case] = _call(fn, case, args)
                bar.update()
        else:
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=num_processes, mp_context=ctx) as pool:
                # submit lazily so that only a bounded number of cases are in flight (memory stays bounded)
                pending: dict[Any, str] = {}
                it: Iterable = iter(items)
                for case, args in _take(it, 2 * num_processes):
                    pending[pool.submit(_call, fn, case, args)] = case
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        case = pending.pop(fut)
                        try:
                            results[case] = fut.result()
                        except BrokenProcessPool as e:
                            raise SamplanError(
                                f"a worker died while processing case '{case}' (most often: out of memory). "
                                f"Re-run with fewer processes (-np 1); finished cases are kept."
                            ) from e
                        bar.update()
                        for nxt_case, nxt_args in _take(it, 1):
                            pending[pool.submit(_call, fn, nxt_case, nxt_args)] = nxt_case
    finally:
        bar.close()
    return {case: results[case] for case, _ in items}


def _take(it: Iterable[T], n: int) -> list[T]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _call(fn: Callable[..., R], case: str, args: tuple) -> R:
    """Run one task; wrap unexpected errors so the message names the case."""
    try:
        return fn(*args)
    except SamplanError:
        raise
    except MemoryError as e:
        raise SamplanError(f"case '{case}': out of memory ({e}). Re-run with fewer processes (-np 1).") from e
    except Exception as e:  # noqa: BLE001 - re-raised with the case named
        raise SamplanError(f"case '{case}': {type(e).__name__}: {e}") from e


def thread_or_processes(workers: int, thread_name: str = "samplan-worker") -> Executor:
    """`workers` spawned worker processes (safe with torch loaded) or, for 0, one background thread."""
    if workers == 0:
        return ThreadPoolExecutor(1, thread_name_prefix=thread_name)
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
