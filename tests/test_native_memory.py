"""predictor/memory.py: glibc's fixed malloc thresholds, checked in a fresh interpreter (mallopt is process-wide).

Measured with getrusage: a step's tensors (a few MiB, allocated and freed layer after layer) are reused from the heap
instead of being faulted in anew (the old 128 KiB mmap threshold, or glibc's 128 KiB trim threshold, cost a page fault
per 4 KiB: about half the speed of a served prefill). That resident memory stays flat under traffic is measured on a
served model (``test_engine_serving.test_memory_is_bounded_under_sustained_traffic``); what glibc trims depends on the
heap's layout (a freed block below a live one stays), so it is not asserted on single tensors here.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

PROBE = r"""
import json, resource
import torch
from predictor.memory import bound_native_memory
assert bound_native_memory()
torch.ones(1 << 20)  # torch's own start-up allocations out of the way
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):  # a 4 MiB activation, made and dropped as every layer of a prefill does
    torch.ones(1 << 20).add_(1)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"faults": faults}))
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
