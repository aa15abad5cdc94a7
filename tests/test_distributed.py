"""Device resolution for training processes, tested as pure functions of the environment and the GPUs seen."""

from __future__ import annotations

import pytest
import torch

from ips_path.runtime.errors import BadInputError
from ips_path.training.distributed import CudaDevices, resolve_device

ONE_GPU = CudaDevices(available=True, count=1, current=0)
FOUR_GPUS = CudaDevices(available=True, count=4, current=0)
NO_GPU = CudaDevices(available=False, count=0, current=0)
TORCHRUN_4 = {"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_auto_and_cuda_on_one_gpu_get_an_index(requested):
    # torch.device("cuda") has no index and made torch.cuda.set_device raise before anything ran.
    assert resolve_device(requested, {}, ONE_GPU) == torch.device("cuda", 0)


def test_plain_cuda_outside_torchrun_takes_the_current_device():
    assert resolve_device("cuda", {}, CudaDevices(True, 4, current=3)) == torch.device("cuda", 3)


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank():
    assert resolve_device("cuda", TORCHRUN_4, FOUR_GPUS) == torch.device("cuda", 2)
    assert resolve_device("auto", TORCHRUN_4, FOUR_GPUS) == torch.device("cuda", 2)
    # torchrun without LOCAL_WORLD_SIZE (older launchers): WORLD_SIZE stands in for it.
    env = {k: v for k, v in TORCHRUN_4.items() if k != "LOCAL_WORLD_SIZE"}
    assert resolve_device("cuda", env, FOUR_GPUS) == torch.device("cuda", 2)


def test_a_fixed_gpu_for_several_processes_on_one_machine_is_refused():
    with pytest.raises(BadInputError, match=r"--device cuda:0 with 4 processes on this machine would put them all "
                                            r"on GPU 0; use --device cuda"):
        resolve_device("cuda:0", TORCHRUN_4, FOUR_GPUS)
    # One process per machine (multi-node): a fixed GPU is fine.
    one_per_node = {**TORCHRUN_4, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert resolve_device("cuda:1", one_per_node, FOUR_GPUS) == torch.device("cuda", 1)


def test_gpus_that_are_not_there_are_refused_in_one_line():
    with pytest.raises(BadInputError, match="--device cuda: no CUDA GPU is visible to this process; use --device cpu"):
        resolve_device("cuda", {}, NO_GPU)
    with pytest.raises(BadInputError, match=r"--device asks for GPU 3 but this process sees 1 GPU\(s\)"):
        resolve_device("cuda:3", {}, ONE_GPU)
    with pytest.raises(BadInputError, match=r"LOCAL_RANK asks for GPU 2 but this process sees 1 GPU\(s\) "
                                            r"\(CUDA_VISIBLE_DEVICES=0\)"):
        resolve_device("cuda", {**TORCHRUN_4, "CUDA_VISIBLE_DEVICES": "0"}, ONE_GPU)


def test_cpu_and_auto_without_a_gpu_stay_on_the_cpu():
    assert resolve_device("auto", {}, NO_GPU) == torch.device("cpu")
    assert resolve_device("cpu", TORCHRUN_4, FOUR_GPUS) == torch.device("cpu")


@pytest.mark.parametrize("requested", ["gpu", "cuda:x", "cuda:-1", ""])
def test_a_name_that_is_no_device_is_refused(requested):
    with pytest.raises(BadInputError, match="is not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device(requested, {}, ONE_GPU)


def test_a_garbled_torchrun_environment_is_refused_naming_the_variable():
    with pytest.raises(BadInputError, match=r"LOCAL_RANK='one' is not a non-negative whole number"):
        resolve_device("cuda", {**TORCHRUN_4, "LOCAL_RANK": "one"}, FOUR_GPUS)
