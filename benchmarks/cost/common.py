"""What every cost benchmark shares: its command line, the machine it ran on, peak memory, and the
one JSON record it prints and appends to the results file.

Absolute times on a shared machine are noise; each benchmark measures ratios inside one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

#: The repository; paths inside it are recorded relative to it (a record names no machine's folders).
ROOT = Path(__file__).resolve().parents[2]
#: Where records are appended unless ``--results`` says otherwise ('' writes none).
RESULTS = ROOT / "docs" / "results" / "benchmarks.jsonl"
#: Shared by every record of one ``python -m benchmarks`` run (set by benchmarks/cost/__main__.py).
RUN_ID_ENV = "FEDPIR_BENCHMARK_RUN"


def parser(description: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser with the options every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="torch device the training runs on (cpu, cuda, cuda:1)")
    p.add_argument("--results", default=str(RESULTS), help="JSON-lines file the record is appended to ('' for none)")
    return p


def machine(device: str) -> dict[str, Any]:
    """Cores, torch threads, device and load of the machine now."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
                            "platform": platform.platform(), "torch": torch.__version__,
                            "load_average": [round(x, 2) for x in os.getloadavg()]}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def emit(name: str, argv: Sequence[str] | None, args: argparse.Namespace, config: dict[str, Any],
         figures: dict[str, Any]) -> dict[str, Any]:
    """Print the benchmark's record (one JSON object, paths inside the repository relative to it) and
    append it to ``args.results``."""
    record = {
        "benchmark": name,
        "run": os.environ.get(RUN_ID_ENV, ""),
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", f"benchmarks.cost.{name}", *(sys.argv[1:] if argv is None else argv)]),
        "config": config,
        "machine": machine(args.device),
        "figures": figures,
    }
    line = json.dumps(record, default=float).replace(f"{ROOT}/", "")
    print(line, flush=True)
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(line + "\n")
    return record


def _tree_rss(root: int) -> int:
    """Resident bytes of process ``root`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * page
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


@dataclass
class Peak:
    """Peak memory seen by :func:`peak_memory`: ``bytes`` at the peak and ``baseline`` at the start."""

    baseline: int = 0
    bytes: int = 0

    @property
    def added(self) -> int:
        """Bytes above the baseline at the peak."""
        return self.bytes - self.baseline


@contextmanager
def peak_memory(device: str, interval: float = 0.05) -> Iterator[Peak]:
    """Peak memory of what runs inside: on CUDA the allocator's peak; on the CPU the resident memory
    of this process and its children (Ray workers included), sampled every ``interval`` seconds."""
    peak = Peak()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        peak.baseline = peak.bytes = torch.cuda.memory_allocated(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = torch.cuda.max_memory_allocated(device)
        return
    pid, stop = os.getpid(), threading.Event()
    peak.baseline = peak.bytes = _tree_rss(pid)

    def sample() -> None:
        while not stop.wait(interval):
            peak.bytes = max(peak.bytes, _tree_rss(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()
        peak.bytes = max(peak.bytes, _tree_rss(pid))


def save_figure(fig: Any, path: Path) -> None:
    """Lay out a matplotlib figure, write it as a PNG to ``path`` (folders made) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def timed(fn, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(fn's result, its wall seconds)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is not positive."""
    return numerator / denominator if denominator > 0 else float("nan")


def _child(queue: Any, fn: Callable[..., dict[str, Any]], threads: int, kwargs: dict[str, Any]) -> None:
    torch.set_num_threads(threads)
    try:
        queue.put(fn(**kwargs))
    except Exception as exc:  # noqa: BLE001 - the record says which configuration failed and why
        queue.put({**{k: v for k, v in kwargs.items() if isinstance(v, str | int | float)},
                   "error": f"{type(exc).__name__}: {exc}"})


def in_child(fn: Callable[..., dict[str, Any]], start: str = "fork", **kwargs: Any) -> dict[str, Any]:
    """``fn(**kwargs)`` in a process of its own, so that its peak memory is its own, with this process'
    torch threads; an exception becomes an ``error`` entry. ``start`` is the multiprocessing start
    method: "fork" starts with the modules imported (never after CUDA was used); "spawn" for work that
    runs Flower's simulation engine (a forked child of a process that ran it hangs in Ray's gRPC)."""
    ctx = multiprocessing.get_context(start)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, torch.get_num_threads(), kwargs))
    proc.start()
    out = queue.get()
    proc.join()
    return out
