"""predictor/memory.py: glibc's fixed malloc thresholds, checked in a fresh interpreter each (mallopt is process-wide).

Two properties, both measured with getrusage and /proc: a step's tensors (a few MiB, allocated and freed layer after
layer) are reused from the heap instead of being faulted in anew (the old 128 KiB threshold cost a page fault per
4 KiB, about half the speed of a served prefill), and a tensor above the mmap threshold returns its memory when freed.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

PROBE = r"""
import json, resource
import torch
from predictor.memory import MMAP_THRESHOLD_BYTES, bound_native_memory
assert bound_native_memory()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
torch.ones(1 << 20)  # torch's own start-up allocations out of the way
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):  # a 4 MiB activation, made and dropped as every layer of a prefill does
    torch.ones(1 << 20).add_(1)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
before = rss()
big = torch.ones(2 * MMAP_THRESHOLD_BYTES // 4)  # above the threshold: mapped, and unmapped when freed
held = rss() - before
del big
print(json.dumps({"faults": faults, "held": held, "returned": held - (rss() - before)}))
"""


def probe() -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_step_sized_tensors_are_reused_not_faulted_in_again():
    bound = probe()
    pages_per_tensor = (4 << 20) // 4096
    # 200 tensors of 4 MiB: faulted in once (~1,000 faults), not 200 times (~200,000 with a 128 KiB mmap threshold)
    assert bound["faults"] < 10 * pages_per_tensor, bound


def test_tensors_above_the_threshold_return_their_memory():
    bound = probe()
    assert bound["held"] > 60 << 20 and bound["returned"] > 0.9 * bound["held"], bound
