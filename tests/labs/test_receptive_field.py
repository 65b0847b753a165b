import pytest

from archlab.labs import run_lab
from archlab.labs.receptive_field import layers_to_reach, measured_receptive_field
from archlab.nn.conv import receptive_field


@pytest.mark.parametrize(("kernel_size", "dilations"), [(2, (1,)), (2, (1, 2, 4)), (3, (1, 3, 9)), (2, (4, 1, 2, 1))])
def test_measured_receptive_field_is_one_plus_k_minus_one_times_the_dilations(kernel_size, dilations):
    assert measured_receptive_field(dilations, kernel_size) == 1 + (kernel_size - 1) * sum(dilations)


@pytest.mark.parametrize("kernel_size", [2, 3])
@pytest.mark.parametrize("n", [1, 2, 3, 17, 1024, 1025, 16000])
def test_layers_to_reach_is_the_fewest_layers_covering_n(kernel_size, n):
    for dilated in (True, False):
        def field(layers):
            return receptive_field(kernel_size, tuple(2**i for i in range(layers)) if dilated else (1,) * layers)

        layers = layers_to_reach(n, kernel_size, dilated)
        assert field(layers) >= n and (layers == 0 or field(layers - 1) < n)


def test_quick_run_dilated_doubles_undilated_adds_one():
    result = run_lab("dilated-receptive-field", quick=True).result
    rows = result.rows
    dilated = [r[2] for r in rows if r[1] == "dilated"]
    undilated = [r[2] for r in rows if r[1] == "undilated"]
    assert dilated == [2**depth for depth in range(1, 7)] and undilated == list(range(2, 8))
    assert all(r[2] == r[3] for r in rows) and result.verdict == "supported"
