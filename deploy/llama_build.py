"""The CMake options llama-cpp-python is built with (``make setup``): this CPU's instruction sets,
named one by one, and never AMX.

llama.cpp's default build is ``-march=native``. On the Xeon (Sapphire Rapids) machines here
/proc/cpuinfo lists amx_tile/amx_int8/amx_bf16, the native build then compiles ggml's AMX matmul
in, and the first decode dies with a general-protection fault on ``ldtilecfg`` (inside Triton's
stub: every Ask after it failed, and the stack lost its model). The virtual machine does not
grant the tile state its flags promise; AVX-512 works. So the build names what it uses instead
of asking the compiler for everything the CPU claims.

    python deploy/llama_build.py            # prints the CMAKE_ARGS for pip
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

# cpuinfo flag(s) -> ggml option. GGML_AVX512 adds -mavx512{f,cd,vl,dq,bw}: all five are needed.
X86_OPTIONS: tuple[tuple[frozenset[str], str], ...] = (
    (frozenset({"sse4_2"}), "GGML_SSE42"),
    (frozenset({"f16c"}), "GGML_F16C"),
    (frozenset({"fma"}), "GGML_FMA"),
    (frozenset({"bmi2"}), "GGML_BMI2"),
    (frozenset({"avx"}), "GGML_AVX"),
    (frozenset({"avx2"}), "GGML_AVX2"),
    (frozenset({"avx_vnni"}), "GGML_AVX_VNNI"),
    (frozenset({"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}), "GGML_AVX512"),
    (frozenset({"avx512vbmi"}), "GGML_AVX512_VBMI"),
    (frozenset({"avx512_vnni"}), "GGML_AVX512_VNNI"),
    (frozenset({"avx512_bf16"}), "GGML_AVX512_BF16"),
)
NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cmake_args(flags: set[str], machine: str) -> list[str]:
    """The -D options for an x86-64 CPU with ``flags``; elsewhere (ARM) the native build, which
    has no AMX to fall into."""
    if machine not in ("x86_64", "AMD64"):
        return []
    args = ["-DGGML_NATIVE=OFF"]
    for needed, option in X86_OPTIONS:
        args.append(f"-D{option}={'ON' if needed <= flags else 'OFF'}")
    args += [f"-D{option}=OFF" for option in NEVER]
    return args


def main() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpu_flags(cpuinfo.read_text(encoding="utf-8")) if cpuinfo.exists() else set()
    sys.stdout.write(" ".join(cmake_args(flags, platform.machine())) + "\n")


if __name__ == "__main__":
    main()
