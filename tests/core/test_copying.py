"""Copies of users' models whose functions close over the model: every verb that returns a copy must compress the
copy's own layers, not leave a lambda calling the caller's."""

import torch
from torch import nn

import torchslim as ts
from torchslim.core.copying import copy_model


class Closure(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)
        self.head = lambda h: self.fc2(torch.relu(h))  # closes over self
        self.extra = [lambda h, layer=self.fc1: layer(h)]  # a default argument holding a layer, inside a list
        self.seen = []
        self.fc1.register_forward_hook(lambda module, args, out: self.seen.append(out.shape))  # a hook closing over self

    def forward(self, x):
        return self.head(self.extra[0](x))


def test_copy_rebinds_lambdas_hooks_and_defaults():
    model = Closure()
    copied = copy_model(model)
    assert copied.head.__closure__[0].cell_contents is copied
    assert copied.extra[0].__defaults__[0] is copied.fc1 and model.extra[0].__defaults__[0] is model.fc1
    x = torch.randn(3, 32)
    copied(x)
    assert copied.seen == [torch.Size([3, 64])] and model.seen == []  # the copy's hook writes to the copy
    with torch.no_grad():
        model.fc2.weight.zero_()
        model.fc1.weight.zero_()
    assert copied(x).abs().max() > 0  # nothing of the original is called


def test_verbs_compress_the_copy_a_lambda_calls():
    torch.manual_seed(0)
    model = Closure().eval()
    x = torch.randn(4, 32)
    before = model(x).detach()
    only_fc2 = {"layers": {"include": ["fc2"]}}
    results = {
        "factorize": ts.factorize(model, {"rank": 2, **only_fc2}, example_input=x).model,
        "quantize": ts.quantize(model, {"weights": {"scheme": "uniform", "bits": 2}, **only_fc2}).model,
        "prune": ts.prune(model, {"sparsity": 0.9, **only_fc2}).model,
    }
    for name, result in results.items():
        assert not torch.equal(result(x), before), name  # the compressed fc2 is what runs
    with torch.no_grad():
        model.fc2.weight.zero_()
    for name, result in results.items():
        assert result(x).abs().max() > 0, name
    gelu = nn.Sequential(nn.Linear(32, 10), nn.GELU())
    gelu.block = lambda h: gelu[1](gelu[0](h))  # a lambda naming the model from outside
    gelu.forward = lambda h: gelu.block(h)
    substituted = ts.substitute_activations(gelu, {"to": "relu"}, example_input=x).model
    assert type(substituted[1]) is nn.ReLU and bool((substituted(x) >= 0).all())
