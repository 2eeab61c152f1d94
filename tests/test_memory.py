"""The memory autograd keeps for the backward pass (deqlite.memory): it grows with the solver's
iterations when unrolling, and stays one application of f with the implicit backward."""
import torch

from deqlite import DEQ, MLPCell
from deqlite.memory import saved_tensor_bytes


def test_unrolled_memory_grows_with_iterations_ift_does_not():
    cell = MLPCell(8, 64, weight_scale=0.9)
    x = torch.randn(32, 8)
    memory = {}
    for rule in ("unrolled", "ift"):
        for n in (10, 40):
            deq = DEQ(cell, solver="forward_iteration", tol=0.0, max_iter=n, backward=rule,
                      on_fail="ignore")
            _, memory[rule, n] = saved_tensor_bytes(deq, x)
    state_bytes = 32 * 64 * 4
    assert memory["unrolled", 40] - memory["unrolled", 10] >= 30 * state_bytes
    assert memory["ift", 40] == memory["ift", 10] < 10 * state_bytes
