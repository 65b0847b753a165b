import torch

from archlab.labs import run_lab
from archlab.labs.scores import WIDTH, counted_flops, largest_allocation


def test_largest_allocation_sees_the_biggest_tensor_made():
    assert largest_allocation(lambda: torch.empty(1000, 250)) == 1000 * 250 * 4
    x = torch.randn(64, 64)
    assert largest_allocation(lambda: x @ x) == 64 * 64 * 4
    assert counted_flops(lambda: x @ x) == 2 * 64**3


def test_quick_run_memory_and_flops_follow_the_shapes():
    """The memory column carries the verdict's first half exactly; the time half is measured, not asserted."""
    report = run_lab("dot-vs-additive", quick=True)
    rows = {(r[0], r[1]): r for r in report.result.rows}
    for n in (64, 128):
        assert rows[(n, "dot")][2] == rows[(n, "scaled_dot")][2] == n * n * 4  # S [N, M] float32
        assert rows[(n, "additive")][2] == n * n * WIDTH * 4  # the tanh hidden [N, M, d_attn]
        assert rows[(n, "dot")][3] == 2 * n * n * WIDTH
        # W_s q and W_h k (2 N d d_attn each) and v_a over the pairs (2 N M d_attn)
        assert rows[(n, "additive")][3] == 2 * 2 * n * WIDTH * WIDTH + 2 * n * n * WIDTH
    # the finding sets the time ratio beside the table's FLOP ratio (2x at N = 128: 1 + 2 d / N), not "similar"
    ratio = rows[(128, "additive")][3] / rows[(128, "dot")][3]
    assert ratio == 1 + 2 * WIDTH / 128
    assert f"for {ratio:.2f}x its matrix FLOPs" in report.result.finding and "similar" not in report.result.finding
