"""The launch a process belongs to (read from the variables torchrun and srun set, through
Lightning's cluster environments), the trainer's placement, and the shared shuffle.
tests/test_launch.py runs the real launchers."""

from __future__ import annotations

import pytest
import torch

from imsvd.config import PretrainConfig
from imsvd.distributed import SharedShuffle, is_writer, launched
from imsvd.errors import ConfigError
from imsvd.training.loop import make_loader, placement, world_size

TORCHRUN = {
    "TORCHELASTIC_RUN_ID": "test",
    "RANK": "3",
    "GROUP_RANK": "1",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "WORLD_SIZE": "4",
}
SLURM = {
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_NNODES": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_JOB_NAME": "imsvd-pretrain",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [*TORCHRUN, *SLURM, "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_no_launcher_means_one_writing_process_and_auto_is_one_device(clean_env):
    assert launched() is None
    assert is_writer()
    assert placement(PretrainConfig()) == (1, 1)
    assert placement(PretrainConfig(devices="2")) == (2, 1)
    assert world_size(PretrainConfig(devices="2", num_nodes=2)) == 4
    clean_env.setenv("LOCAL_RANK", "1")  # a worker re-executed by Lightning's own DDP launcher
    assert not is_writer()


def test_torchrun_sets_rank_world_and_placement(clean_env):
    for name, value in TORCHRUN.items():
        clean_env.setenv(name, value)
    launch = launched()
    assert launch is not None
    assert (launch.launcher, launch.global_rank, launch.world_size, launch.num_nodes) == ("torchrun", 3, 4, 2)
    assert not is_writer()
    assert placement(PretrainConfig()) == (2, 2)
    with pytest.raises(ConfigError, match=r"pretrain\.devices=4 but torchrun started 2"):
        placement(PretrainConfig(devices="4"))
    with pytest.raises(ConfigError, match=r"pretrain\.num_nodes=3 but torchrun started 2"):
        placement(PretrainConfig(num_nodes=3))


def test_srun_tasks_are_a_launch_and_one_task_is_not(clean_env):
    for name, value in SLURM.items():
        clean_env.setenv(name, value)
    launch = launched()
    assert launch is not None and (launch.launcher, launch.world_size, launch.num_nodes) == ("slurm", 8, 2)
    assert is_writer()  # task 0
    clean_env.setenv("SLURM_NTASKS", "1")  # an sbatch script running kedro run directly
    assert launched() is None


def test_the_global_batch_must_split_over_the_processes(clean_env):
    for name, value in TORCHRUN.items():
        clean_env.setenv(name, value)
    with pytest.raises(ConfigError, match=r"pretrain\.batch_size=254 .* 4 processes"):
        make_loader(list(range(1000)), PretrainConfig(batch_size=254))  # type: ignore[arg-type]
    assert make_loader(list(range(1000)), PretrainConfig(batch_size=256)).batch_size == 64  # type: ignore[arg-type]


def test_the_ranks_shares_make_up_the_batches_of_one_process():
    size, batch, world = 103, 16, 4
    whole = list(SharedShuffle(size, batch, seed=5))
    assert len(whole) == 96  # whole global batches only
    shares = []
    for rank in range(world):
        sampler = SharedShuffle(size, batch, seed=5)
        sampler._place = lambda rank=rank: (rank, world)  # type: ignore[method-assign]
        shares.append(list(sampler))
        assert len(sampler) == 96 // world
    per_rank = batch // world
    for k in range(96 // batch):
        union = sorted(i for share in shares for i in share[k * per_rank : (k + 1) * per_rank])
        assert union == sorted(whole[k * batch : (k + 1) * batch])
    again = SharedShuffle(size, batch, seed=5)
    again.set_epoch(1)
    assert list(again) != whole  # a fresh order each epoch
    assert torch.equal(torch.tensor(list(SharedShuffle(size, batch, seed=5))), torch.tensor(whole))
