"""What is alive at the peak of one step: a CUDA memory trace reduced to the allocations that coexist at the
highest point, grouped by the code that made them.

    with MemoryTrace() as trace:
        train_step(...)
    report = trace.report()          # {"traced_peak_gib": ..., "sites": [{"gib": ..., "site": ...}, ...]}

PyTorch's allocator records every allocation and free with its Python stack
(`torch.cuda.memory._record_memory_history`); replaying the events gives the set alive when the running total
was highest. Only allocations made inside the trace count: what was resident before it (weights, optimizer
state) is reported apart, as `resident_before_gib`. A site is the innermost few frames that are ours,
transformers', DeepSpeed's or torch.optim's, so that an OOM at scale reads as lines of code, not as a pickle
to open elsewhere.
"""

from __future__ import annotations

from collections import Counter

import torch

GIB = 2**30
# Frames worth naming in a site: the code whose tensors these are.
SITE_PACKAGES = ("indexcache_train", "transformers", "deepspeed", "torch/optim")
SITE_DEPTH = 3
MAX_EVENTS = 500_000


def live_at_peak(events: list[dict]) -> tuple[int, list[dict]]:
    """The highest running total of `events` (a device trace of alloc / free_completed) and the allocations
    alive at that point."""
    live: dict[int, dict] = {}
    total = peak = 0
    at_peak: list[dict] = []
    for event in events:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, list(live.values())
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    return peak, at_peak


def site(event: dict) -> str:
    """The innermost frames of an allocation that belong to `SITE_PACKAGES`, innermost first."""
    frames = [f for f in event.get("frames", []) if any(p in f["filename"] for p in SITE_PACKAGES)]
    return " <- ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in frames[:SITE_DEPTH]) \
        or "(outside the traced packages)"


class MemoryTrace:
    """Records the CUDA allocator's events within the block; `report()` reduces them (see the module doc)."""

    def __init__(self, device: torch.device | None = None, top: int = 20):
        self.device, self.top = device, top
        self.snapshot: dict | None = None

    def __enter__(self) -> MemoryTrace:
        if not torch.cuda.is_available():
            raise RuntimeError("A memory trace needs a CUDA device: the CPU allocator records no history.")
        torch.cuda.synchronize(self.device)
        self.resident = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=MAX_EVENTS, device=self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.max_allocated = torch.cuda.max_memory_allocated(self.device)
        self.snapshot = torch.cuda.memory._snapshot(self.device)
        torch.cuda.memory._record_memory_history(enabled=None, device=self.device)

    def report(self) -> dict:
        if self.snapshot is None:
            raise RuntimeError("report() reads a finished trace: call it after the with-block.")
        index = torch.cuda.current_device() if self.device is None else torch.device(self.device).index or 0
        events = self.snapshot["device_traces"][index]
        peak, alive = live_at_peak(events)
        sites: Counter[str] = Counter()
        for event in alive:
            sites[site(event)] += event["size"]
        return {
            "resident_before_gib": self.resident / GIB,
            "max_allocated_gib": self.max_allocated / GIB,
            "traced_peak_gib": peak / GIB,
            "events": len(events),
            "trace_complete": len(events) < MAX_EVENTS,  # the allocator keeps only the last MAX_EVENTS
            "sites": [{"gib": size / GIB, "site": name} for name, size in sites.most_common(self.top)],
        }


def format_report(report: dict) -> str:
    lines = [f"Memory at the step's peak: {report['max_allocated_gib']:.2f} GiB allocated, of which "
             f"{report['resident_before_gib']:.2f} GiB were resident before it; the step's own allocations "
             f"alive at its peak, {report['traced_peak_gib']:.2f} GiB, by site:"]
    lines += [f"{entry['gib']:8.2f} GiB  {entry['site']}" for entry in report["sites"]]
    return "\n".join(lines)
