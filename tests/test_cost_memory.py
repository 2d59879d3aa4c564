"""Peak activation memory (liveness) and memory traffic against hand-computed numbers."""

from __future__ import annotations

import torch
from torch import nn

from survey_lib.cost import memory_traffic, peak_activation_memory
from survey_lib.cost.memory import live_bytes_per_op, moves_data
from survey_lib.cost.counting import trace

F32 = 4


def traffic_by_layer(model, x, bits=None):
    df = memory_traffic(model, x, bits)
    return df.set_index("name")["traffic_bytes"].to_dict(), df.attrs["total_bytes"]


def test_mlp_peak_and_traffic_by_hand():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(1, 4)
    # live: addmm1 {x 16, h 12} = 28; relu {h 12, r 12}; addmm2 {r 12, y 8}
    assert peak_activation_memory(model, x) == (4 + 3) * F32
    per, total = traffic_by_layer(model, x)
    # Linear: weights + bias read, input read, output written; ReLU: read + write
    assert per == {"0": (12 + 3 + 4 + 3) * F32, "1": (3 + 3) * F32, "2": (6 + 2 + 3 + 2) * F32}
    assert total == 164


def test_conv_chain_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.Conv2d(2, 1, 3, bias=False))
    x = torch.randn(1, 1, 5, 5)  # 25 -> 2x3x3 = 18 -> 1
    assert peak_activation_memory(model, x) == (25 + 18) * F32
    per, total = traffic_by_layer(model, x)
    assert per == {"0": (18 + 25 + 18) * F32, "1": (18 + 18) * F32, "2": (18 + 18 + 1) * F32}
    assert total == 536


def test_inplace_relu_adds_no_buffer():
    def net(inplace):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=inplace), nn.Linear(16, 2))

    x = torch.randn(1, 4)
    # out-of-place: relu step holds h (64) and relu(h) (64); in-place: the addmm1 step {x 16, h 64} is the peak
    assert peak_activation_memory(net(False), x) == 2 * 16 * F32
    assert peak_activation_memory(net(True), x) == (4 + 16) * F32
    # traffic is the same: an in-place ReLU still reads and writes its tensor
    assert traffic_by_layer(net(True), x)[1] == traffic_by_layer(net(False), x)[1]


class Body(nn.Module):
    def __init__(self, residual):
        super().__init__()
        self.residual = residual
        self.lin1, self.relu, self.lin2 = nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 64)

    def forward(self, x):
        y = self.lin2(self.relu(self.lin1(x)))
        return x + y if self.residual else y


def test_residual_skip_stays_live():
    x = torch.randn(1, 64)
    plain = peak_activation_memory(Body(False), x)
    res = peak_activation_memory(Body(True), x)
    assert plain == (64 + 16) * F32  # x with h at lin1, or r with y at lin2
    assert res == (64 + 64 + 64) * F32  # x, y and x + y at the add
    assert res > plain


def test_views_move_no_data_and_low_bits_shrink_traffic():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    x = torch.randn(1, 2, 3)
    per, _ = traffic_by_layer(model, x)
    assert per["0"] == 0
    assert per["1"] == (18 + 3 + 6 + 3) * F32
    per8, _ = traffic_by_layer(model, x, bits={"1": (8, 8)})
    assert per8["1"] == 18 + 3 + 6 + 3
    per4, _ = traffic_by_layer(model, x, bits={"1": (4, 8)})
    assert per4["1"] == (18 + 3) // 2 + 1 + 6 + 3  # 21 weights at 4 bits = 10.5 -> 11 bytes
    assert not moves_data("aten.view.default") and moves_data("aten.addmm.default")


def test_model_output_live_to_the_end_and_batch_scales():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    tr = trace(model, torch.randn(1, 8))
    live = live_bytes_per_op(tr)
    assert len(live) == len(tr.ops) and live[-1] >= 8 * F32
    assert peak_activation_memory(model, torch.randn(4, 8)) == 4 * peak_activation_memory(model, torch.randn(1, 8))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 64), nn.Linear(4, 2)

    def forward(self, x):
        return self.a(x), self.b(x)


def test_early_output_stays_live():
    # head a's output is made first and never read again, but it is returned: live to the end
    assert peak_activation_memory(TwoHeads(), torch.randn(1, 4)) == (4 + 64 + 2) * F32


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_memory_arguments():
    import pytest

    from survey_lib.cost import memory as M

    model, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 8, 8)
    tr = trace(model, x)
    with pytest.raises(ValueError, match=r"bits\['0'\]=-3"):
        memory_traffic(model, x, bits={"0": (-3, 8)})
    with pytest.raises(ValueError, match=r"bits\['0'\]=0"):
        memory_traffic(model, x, bits={"0": (0, 0)})
    for fn in (live_bytes_per_op, M.peak_trace, lambda t: M.traffic_trace(model, t)):
        with pytest.raises(TypeError, match="tr must be an OpTrace"):
            fn("trace")
    with pytest.raises(TypeError, match="o must be an OpRecord"):
        M.op_traffic("op", 4, 8)
    with pytest.raises(ValueError, match="wbits=-4"):
        M.op_traffic(tr.ops[0], -4, 8)
    with pytest.raises(ValueError, match="bits=-4"):
        M.tensor_bytes(tr.ops[0].inputs[0], -4)
    with pytest.raises(TypeError, match="op must be"):
        moves_data(5)
    with pytest.raises(TypeError, match="model"):
        peak_activation_memory("model", x)
