"""METHOD.md section 3: with exact duplicate neurons, fusion keeps the Adam kernel G sign(G)^T; fold does not."""

import torch
from torch import nn

from mlp_fusion import FusionConfig, fuse


class ToyMlp(nn.Module):
    def __init__(self, dim=4, width=8):
        super().__init__()
        self.fc1 = nn.Linear(dim, width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, dim)
        self.readout = torch.randn(dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) @ self.readout


def toy_with_duplicates():
    torch.manual_seed(0)
    model = ToyMlp()
    groups = torch.tensor([0, 1, 1, 2, 2, 3, 3, 3])  # 4 distinct neurons, sizes 1, 2, 2, 3
    with torch.no_grad():
        model.fc1.weight.copy_(model.fc1.weight[groups])
        model.fc1.bias.copy_(model.fc1.bias[groups])
        model.fc2.weight.copy_(model.fc2.weight[:, groups])
    return model


def kernels(model, probes):
    rows = []
    for x in probes:
        grads = torch.autograd.grad(model(x), list(model.parameters()))
        rows.append(torch.cat([g.flatten() for g in grads]).double())
    g = torch.stack(rows)
    return g @ g.sign().T, g @ g.T


def relative_error(a, b):
    return float((a - b).norm() / a.norm())


def test_fusion_keeps_the_adam_kernel_and_fold_does_not():
    probes = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    original = toy_with_duplicates()
    adam, sgd = kernels(original, probes)
    fused, folded = toy_with_duplicates(), toy_with_duplicates()
    fuse(fused, FusionConfig(method="fusion", width=4))
    fuse(folded, FusionConfig(method="fold", width=4))
    with torch.no_grad():
        same_outputs = torch.stack([fused(x) for x in probes]), torch.stack([folded(x) for x in probes])
        reference = torch.stack([original(x) for x in probes])
    torch.testing.assert_close(same_outputs[0], reference)
    torch.testing.assert_close(same_outputs[1], reference)

    fused_adam, fused_sgd = kernels(fused, probes)
    folded_adam, _ = kernels(folded, probes)
    assert relative_error(adam, fused_adam) < 1e-6
    assert relative_error(adam, folded_adam) > 0.05
    # The same scale multiplies the plain-gradient (SGD) kernel's group terms by n^2: not preserved.
    assert relative_error(sgd, fused_sgd) > 0.05
