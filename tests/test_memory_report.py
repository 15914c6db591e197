import pytest
import torch

from indexcache_train.memory_report import MemoryTrace, format_report, live_at_peak, site


def alloc(addr, size, frames=()):
    return {"action": "alloc", "addr": addr, "size": size, "frames": list(frames)}


def free(addr, size):
    return {"action": "free_completed", "addr": addr, "size": size}


def test_the_peak_set_is_what_coexists_at_the_highest_total():
    # 10 and 20 coexist (30); after 20 goes, 10 + 5 + 12 (27) never passes it; a free of an address
    # allocated before the trace is ignored.
    events = [alloc(1, 10), alloc(2, 20), free(2, 20), free(99, 7), alloc(3, 5), alloc(4, 12)]
    peak, alive = live_at_peak(events)
    assert peak == 30
    assert sorted(e["addr"] for e in alive) == [1, 2]


def test_a_site_names_the_innermost_frames_of_the_traced_packages():
    frames = [{"filename": "/x/torch/nn/modules/linear.py", "line": 1, "name": "forward"},
              {"filename": "/x/indexcache_train/teacher.py", "line": 74, "name": "absorbed_query"},
              {"filename": "/x/transformers/models/glm/modeling.py", "line": 9, "name": "forward"}]
    assert site(alloc(1, 1, frames)) == "teacher.py:74 absorbed_query <- modeling.py:9 forward"
    assert site(alloc(1, 1)) == "(outside the traced packages)"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_trace_finds_the_tensors_alive_at_the_peak():
    resident = torch.empty(2**20, device="cuda")
    with MemoryTrace() as trace:
        kept = torch.empty(2**26, dtype=torch.uint8, device="cuda")       # 64 MiB, alive at the peak
        transient = torch.empty(2**25, dtype=torch.uint8, device="cuda")  # 32 MiB, also at the peak
        del transient
        small = torch.empty(2**20, dtype=torch.uint8, device="cuda")      # after the peak
    report = trace.report()
    assert report["resident_before_gib"] >= resident.numel() * 4 / 2**30
    assert abs(report["traced_peak_gib"] * 2**30 - 3 * 2**25) < 2**21
    assert report["sites"][0]["site"] == "(outside the traced packages)"  # a test file is none of them
    assert "Memory at the step's peak" in format_report(report)
    del kept, small
