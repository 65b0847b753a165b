"""What the machine computes natively: the CPU's name, the kernels PyTorch dispatches to, native bf16.

The machines archlab runs on differ (an AVX2-only AMD EPYC; an Intel Xeon with AVX-512, AVX512-BF16,
VNNI and, where the hypervisor exposes it, AMX). Benchmarks print :func:`describe_cpu` so that every
figure says which kind produced it; fast paths ask :func:`native_bf16` before choosing bf16.

``ATEN_CPU_CAPABILITY=avx2`` (with ``ONEDNN_MAX_CPU_ISA=AVX2``) caps PyTorch's kernels below what the CPU
has; :func:`kernel_capability` reports the cap in force, and :func:`native_bf16` honours it.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from archlab.errors import ConfigError


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``"Intel(R) Xeon(R) Processor"``), or the platform's word."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def kernel_capability() -> str:
    """The instruction set PyTorch's CPU kernels use now: ``"AVX512"``, ``"AVX2"``, ``"DEFAULT"`` (a cap applies)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_features() -> dict[str, bool]:
    """The CPU's matrix features as PyTorch sees them (AMX tiles, AVX512-BF16, VNNI)."""
    return {
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "vnni": bool(torch.cpu._is_vnni_supported()),
    }


def native_bf16(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether bf16 matmuls run natively on ``device``, and why (a phrase for a log line).

    CPU: native with AMX or AVX512-BF16 while the kernels are not capped below AVX-512; otherwise
    bf16 is emulated through fp32 and slower than fp32. CUDA: the device's own answer.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:  # "bogus", None; an int is an accelerator's index (none may exist)
        raise ConfigError(
            f"device={device!r} is not a device on this machine: pass 'cpu', 'cuda', 'cuda:0' or a torch.device"
        ) from e
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "this GPU computes bf16" if ok else "this GPU has no bf16"
    if device.type != "cpu":
        return False, f"no bf16 rule for device type {device.type!r}"
    features = cpu_features()
    if kernel_capability() != "AVX512":
        return False, f"the CPU kernels are capped at {kernel_capability()}: bf16 is emulated"
    if features["amx"]:
        return True, "the CPU has AMX bf16 tiles"
    if features["avx512_bf16"]:
        return True, "the CPU has AVX512-BF16"
    return False, "the CPU has neither AMX nor AVX512-BF16: bf16 is emulated"


def describe_cpu() -> str:
    """One line for a benchmark's header: name, kernels in use, matrix features, native bf16 or not."""
    have = [name for name, ok in cpu_features().items() if ok]
    bf16, why = native_bf16("cpu")
    return (f"{cpu_name()}; kernels {kernel_capability()}; features {', '.join(have) or 'none of amx/avx512_bf16/vnni'}; "
            f"bf16 {'native' if bf16 else 'emulated'} ({why})")  # fmt: skip
