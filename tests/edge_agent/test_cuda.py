"""The CUDA path (Jetson-class devices, GPU coordinator hosts): the same code as on CPU.

Every test needs a GPU and is skipped without one; CI has none. `scripts/gpu_check.sh` runs
them on a GPU host. The CPU-only checks of the device option live with the simulator tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedprune.coordinator.lab.simulate import SimulationConfig, run_simulation
from fedprune.coordinator.core.strategy import StrategyConfig
from fedprune.common.models import ModelSpec
from fedprune.edge_agent.training import train_local
from fedprune.edge_agent.worker import TrainJob, train_in_child
from fedprune.protocol.hyperparams import HyperParams
from fedprune.protocol.messages import ModelRef
from tests.edge_agent.test_training import MLP, sparse_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CNN = ModelSpec("cnn2d", (1, 8, 8), 10)


def test_random_growth_training_matches_cpu(digits):
    params, masks = sparse_state(MLP, 0.2, 9)
    hp = HyperParams(epochs=2, batch_size=32, readjust=True, prune_fraction=0.3, growth="random", seed=3)
    cpu = train_local(MLP, params, masks, *digits, hp, device="cpu")
    gpu = train_local(MLP, params, masks, *digits, hp, device="cuda")
    for name in masks:
        assert np.array_equal(cpu.masks[name], gpu.masks[name])
    for name in params:
        assert np.allclose(cpu.delta[name], gpu.delta[name], atol=1e-4)
    assert cpu.class_losses.keys() == gpu.class_losses.keys()


@pytest.mark.parametrize("spec", [MLP, CNN], ids=["mlp", "cnn2d"])
def test_gradient_growth_on_cuda_keeps_the_mask_invariants(digits, spec):
    """Gradient growth ranks |grad|, so rounding may break a tie differently from the CPU; the
    invariants (nnz per layer, zeros outside the mask) must hold exactly, and the masks agree
    almost everywhere."""
    params, masks = sparse_state(spec, 0.2, 4)
    hp = HyperParams(epochs=2, batch_size=16, readjust=True, prune_fraction=0.3, seed=5)
    cpu = train_local(spec, params, masks, *digits, hp, device="cpu")
    gpu = train_local(spec, params, masks, *digits, hp, device="cuda")
    for name, mask in masks.items():
        assert gpu.masks[name].sum() == mask.sum()
        assert not gpu.delta[name][~gpu.masks[name]].any()
        assert (gpu.masks[name] == cpu.masks[name]).mean() > 0.99
    assert gpu.mask_changed
    assert abs(gpu.train_loss - cpu.train_loss) < 0.05


def test_the_agents_training_child_trains_on_cuda(tmp_path, digits):
    """agent.device = cuda reaches train_local through the training child, as on a Jetson."""
    X, y = digits
    data = tmp_path / "data.npz"
    np.savez(data, X=X, y=y)
    spec = ModelSpec("mlp", (1, 8, 8), 10)  # a task names the built-in model, default widths
    params, masks = sparse_state(spec, 0.2, 1)
    hyper = HyperParams(epochs=1, batch_size=16, readjust=True, prune_fraction=0.2, growth="random", seed=2)
    outcomes = {device: train_in_child(TrainJob(
        model=ModelRef("mlp", (1, 8, 8), 10), params=params, masks=masks, hyper=hyper, data_path=data,
        device=device, threads=1), timeout_s=300) for device in ("cpu", "cuda")}
    for name in params:
        assert np.allclose(outcomes["cpu"].delta[name], outcomes["cuda"].delta[name], atol=1e-4)
    assert outcomes["cuda"].n_examples == len(y)


def test_a_simulation_on_cuda_learns_as_on_cpu():
    cfg = SimulationConfig(n_clients=6, partition="iid", seed=1, strategy=StrategyConfig(
        rounds=6, sparsity=0.8, delta_t=2, local=HyperParams(batch_size=16, growth="random")))
    cpu, gpu = run_simulation(cfg, device="cpu"), run_simulation(cfg, device="cuda")
    assert gpu.final_score > 0.6
    assert abs(gpu.final_score - cpu.final_score) < 0.03
    assert abs(gpu.uplink_bytes - cpu.uplink_bytes) < 0.02 * cpu.uplink_bytes
