"""What this machine's CPU can do for matrix products: the facts the dtype policy and the benchmarks name.

Machines of one cluster are not all the same CPU (Intel Xeon with AMX, AMD EPYC Zen 4, older AVX2 parts), and
the fastest dtype follows from the matrix units: bfloat16 where the CPU multiplies bfloat16 natively (AMX-BF16 or
AVX512-BF16, as vLLM-CPU chooses), float32 elsewhere, where bfloat16 is emulated and slower than float32.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# The /proc/cpuinfo flags that decide a matmul path, in the order they are reported.
MATMUL_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def matmul_flags(self) -> list[str]:
        return [f for f in MATMUL_FLAGS if f in self.flags]

    @property
    def native_bf16(self) -> bool:
        """bfloat16 products in hardware (AMX tiles or AVX512-BF16 dot products)."""
        return "amx_bf16" in self.flags or "avx512_bf16" in self.flags

    @property
    def native_int8(self) -> bool:
        """int8 dot products in hardware (AMX-INT8 or VNNI)."""
        return bool({"amx_int8", "avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def compiles_by_default(self) -> bool:
        """Whether ``--compile`` is on unless a flag says otherwise: on CPUs that multiply bfloat16 natively (AMX or
        AVX512-BF16). Measured, bfloat16 SmolLM2, 2 cores: Intel Xeon with AMX, median decode step in process, 24.6 / 29.9 ms
        compiled against 29.0 / 36.1 ms eager at batch 1 / 16 (1.18x / 1.21x); AMD EPYC (AVX512-BF16, no AMX), served (the
        closed loop of ``make bench``, two servers of each alternated), 37.7-40.8 against 33.0-34.6 tok/s at C=1 and
        359-361 against 292-319 at C=16 (1.09-1.24x, 1.13-1.23x; before ``memory.py``'s malloc thresholds were raised, not
        re-measured since). In process on another AMD EPYC, batch 1 had read 0.88x."""
        return self.native_bf16

    def describe(self) -> str:
        return f"{self.model} ({', '.join(self.matmul_flags) or 'no AVX2/AVX512/AMX'})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's model name and flags from the text of ``/proc/cpuinfo``."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model or platform.processor() or platform.machine(), flags)


@cache
def cpu_info() -> CpuInfo:
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: no flags known, so no native bfloat16 is assumed
        return CpuInfo(platform.processor() or platform.machine(), frozenset())
