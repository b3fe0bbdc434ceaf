"""utils.memory on hand-worked cases (the tracker is tested on attention in
test_flash_attention.py, state_dict_bytes in test_quantization.py)."""

import torch

from utils.memory import saved_tensor_bytes


def test_saved_tensor_bytes_hand_worked():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, 5, requires_grad=True)
    # mm saves both operands (4*3 + 3*5 floats); sum saves nothing
    assert saved_tensor_bytes(lambda: (x @ w).sum()) == (12 + 15) * 4
    # exp saves its output (4*3 floats) and mm its operands
    assert saved_tensor_bytes(lambda: (x @ w).exp().sum()) == (12 + 15 + 20) * 4
