"""What every benchmark prints about its machine."""

import torch

from lightning_mp.machine import bf16_support, cpu_model, describe


def test_describe_names_the_cpu_its_bf16_support_threads_and_torch():
    line = describe()
    assert "\n" not in line
    assert cpu_model() in line and cpu_model()
    assert bf16_support() in ("AMX", "avx512_bf16", "none")
    assert f"native bf16: {bf16_support()}" in line
    assert f"{torch.get_num_threads()} threads" in line and torch.__version__ in line
