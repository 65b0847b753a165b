"""archlab.hardware: the CPU description and the native-bf16 rule, natively and with the kernels capped."""

import os
import subprocess
import sys

import pytest
import torch

from archlab.errors import ConfigError
from archlab.hardware import cpu_name, describe_cpu, kernel_capability, native_bf16


def test_describe_cpu_names_the_kernels_and_the_bf16_answer():
    line = describe_cpu()
    assert cpu_name() in line and f"kernels {kernel_capability()}" in line
    ok, why = native_bf16()
    assert ("bf16 native" if ok else "bf16 emulated") in line and why in line


def test_native_bf16_follows_the_cpu_features():
    ok, why = native_bf16("cpu")
    has_hw = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert ok == (has_hw and kernel_capability() == "AVX512"), why


def test_capped_kernels_mean_emulated_bf16():
    code = "from archlab.hardware import native_bf16, kernel_capability; print(kernel_capability(), native_bf16()[0])"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] in ("AVX2", "DEFAULT") and out[1] == "False"


def test_meta_and_unknown_devices_are_not_native():
    assert native_bf16("meta") == (False, "no bf16 rule for device type 'meta'")


@pytest.mark.parametrize("device", ["bogus", None])
def test_a_device_that_is_not_one_is_refused_by_name(device):
    with pytest.raises(ConfigError, match=f"device={device!r} is not a device on this machine"):
        native_bf16(device)
