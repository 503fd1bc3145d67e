"""The CPU's integer/bf16 ISA, for benchmark table headers (Linux x86 /proc/cpuinfo)."""
from __future__ import annotations

from runtime_eval.session import cpu_model  # the harness's own reader of the model name

#: flag -> what to call it in a table header, most relevant first
_FLAGS = [
    ("amx_int8", "AMX-INT8"), ("amx_bf16", "AMX-BF16"), ("avx512_vnni", "AVX512-VNNI"),
    ("avx_vnni", "AVX-VNNI"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512F"), ("avx2", "AVX2"),
]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_summary() -> str:
    """e.g. ``AMD EPYC, 2 CPUs: AVX512-VNNI, AVX512-BF16, AVX512F, AVX2 (no AMX)``."""
    import os

    flags = cpu_flags()
    have = [name for flag, name in _FLAGS if flag in flags]
    amx = "" if any(f.startswith("amx") for f in flags) else " (no AMX)"
    return f"{cpu_model()}, {os.cpu_count()} CPUs: {', '.join(have) or 'unknown ISA'}{amx}"
