import dataclasses

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.errors import ChecksumError, TorchslimError
from torchslim.io.modelfile import build_from_spec, load_model, load_weights, save_model


class UserNet(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.body(x)


def make_user_net(hidden: int = 16) -> UserNet:
    return UserNet(hidden)


@pytest.mark.parametrize("name", ["lenet-5", "resnet20", "char-transformer"])
def test_save_load_gives_identical_outputs(tmp_path, name):
    torch.manual_seed(0)
    model = ts.models.create(name).eval()
    example = torch.randint(0, 65, (2, 16)) if name == "char-transformer" else torch.randn(2, *((1, 28, 28) if name == "lenet-5" else (3, 32, 32)))
    path = ts.save(model, tmp_path / "model.safetensors")
    again = ts.load(path)
    assert torch.equal(again(example), model(example))
    assert again.torchslim_spec == model.torchslim_spec


def test_loaded_weights_are_aligned_so_a_pruned_model_reloads_bit_for_bit(tmp_path):
    """Tensors in a file start wherever the header leaves them; the loader gives each unaligned one its own copy, so
    CPU kernels take the code path (and summation order) they took for the model that was saved."""
    torch.manual_seed(0)
    model = ts.prune_channels(ts.models.create("lenet-5"), {"ratio": 0.5}, example_input=torch.zeros(1, 1, 28, 28)).model.eval()
    again = ts.load(ts.save(model, tmp_path / "pruned.safetensors"))
    assert all(tensor.data_ptr() % 64 == 0 for tensor in again.state_dict().values())
    example = torch.randn(8, 1, 28, 28)
    assert torch.equal(again(example), model(example))


def test_import_path_factory_needs_trust(tmp_path):
    model = make_user_net(12).eval()
    model.body[1].running_mean.fill_(0.5)
    spec = {"factory": "tests.io.test_modelfile:make_user_net", "kwargs": {"hidden": 12}}
    path = save_model(model, tmp_path / "user.safetensors", spec=spec)
    with pytest.raises(TorchslimError, match="trust_factory=True"):
        load_model(path)
    again = load_model(path, trust_factory=True)
    x = torch.randn(3, 8)
    assert torch.equal(again(x), model(x))


TOUCH = {"command": "touch {marker}"}
SEQUENTIAL = "torchslim.io.modelfile:sequential"


@pytest.mark.parametrize(
    "spec",
    [
        {"factory": "torch.nn.modules.module:torch.os.system", "kwargs": TOUCH},
        {"factory": "torch.nn.modules.linear:Linear.__init__.__globals__.torch.os.system", "kwargs": TOUCH},
        {"factory": SEQUENTIAL, "kwargs": {"layers": [["0", {"factory": "torch.nn.modules.linear:torch.os.system", "kwargs": TOUCH}]]}},
        {"factory": SEQUENTIAL, "kwargs": {"layers": [["0", {"factory": "tests.io.test_modelfile:make_user_net", "kwargs": {}}]]}},
    ],
)
def test_a_file_cannot_run_code_through_the_layers_trusted_without_trust_factory(tmp_path, spec):
    """torch's own layer classes and the builder of a plain Sequential load without trust_factory; nothing else does,
    however the import path is dressed up (an attribute path through torch's modules) or nested in a Sequential."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    marker = tmp_path / "ran"
    good = ts.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "good.safetensors")
    with safe_open(str(good), "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 - a safetensors handle is not iterable
    metadata["torchslim.spec"] = json.dumps(spec).replace("{marker}", str(marker))
    save_file(tensors, str(tmp_path / "crafted.safetensors"), metadata=metadata)
    with pytest.raises(TorchslimError, match="importing it runs its code, so pass trust_factory=True"):
        ts.load(tmp_path / "crafted.safetensors")
    assert not marker.exists()
    assert torch.equal(ts.load(good)(torch.ones(1, 2)), ts.load(good)(torch.ones(1, 2)))


def test_a_users_own_class_saves_as_it_can_be_rebuilt(tmp_path):
    """A model without a spec records its class and the constructor arguments its attributes hold, checked by
    rebuilding it; where that cannot give the model, the error says to name the factory, and naming it works."""
    model = UserNet()
    path = ts.save(model, tmp_path / "x.safetensors")
    with pytest.raises(TorchslimError, match="trust_factory"):
        ts.load(path)
    x = torch.randn(4, 8)
    assert torch.equal(ts.load(path, trust_factory=True).eval()(x), model.eval()(x))
    wide = UserNet(hidden=32)  # the width is no attribute of the model: rebuilding with the default would not fit
    with pytest.raises(TorchslimError, match="does not give this model .*save with factory="):
        ts.save(wide, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()
    path = ts.save(wide, tmp_path / "w.safetensors", factory="tests.io.test_modelfile:make_user_net", kwargs={"hidden": 32})
    assert torch.equal(ts.load(path, trust_factory=True).eval()(x), wide.eval()(x))

    class Local(nn.Linear):
        pass

    with pytest.raises(TorchslimError, match="cannot be imported again"):
        ts.save(Local(2, 2), tmp_path / "l.safetensors")


class HeadsNet(nn.Module):
    """Constructor arguments kept under other names (or not at all): same tensors whatever they are."""

    def __init__(self, heads: int = 4, activation: str = "relu", temperature: float = 1.0) -> None:
        super().__init__()
        self.h = heads
        self.proj = nn.Linear(8, 8)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.soft = lambda t: torch.softmax(t / temperature, -1)

    def forward(self, x):
        b, d = x.shape
        return self.soft(self.act(self.proj(x)).view(b, self.h, d // self.h)).reshape(b, d)


def make_heads_net(**kwargs) -> HeadsNet:
    return HeadsNet(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "difference"),
    [
        ({"activation": "gelu"}, "act is ReLU rebuilt, GELU in the model"),
        ({"temperature": 5.0}, r"soft is HeadsNet.__init__.<locals>.<lambda>\(1.0\) rebuilt, HeadsNet.__init__.<locals>.<lambda>\(5.0\)"),
    ],
)
def test_a_default_the_model_keeps_no_attribute_of_is_checked_before_it_is_recorded(tmp_path, kwargs, difference):
    """The tensors of a model built with other arguments had the same names and shapes, so the file recorded the
    defaults and ts.load built another model (another activation or temperature) without a word."""
    model = HeadsNet(**kwargs).eval()
    with pytest.raises(TorchslimError, match=f"keeps no attribute named 'heads', 'activation', 'temperature'.*differs: {difference}"):
        ts.save(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    path = ts.save(model, tmp_path / "m.safetensors", factory="tests.io.test_modelfile:make_heads_net", kwargs=kwargs)
    x = torch.randn(3, 8)
    assert torch.equal(ts.load(path, trust_factory=True).eval()(x), model(x))
    default = HeadsNet().eval()  # built with the defaults: the rebuilt model is the same, so it saves as before
    assert torch.equal(ts.load(ts.save(default, tmp_path / "d.safetensors"), trust_factory=True).eval()(x), default(x))


class Counting(nn.Module):
    def __init__(self, hidden: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden, self.calls = hidden, 0
        self.fc = nn.Linear(4, hidden)

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_a_plain_attribute_that_differs_is_said_not_refused(tmp_path):
    """A plain attribute may be the argument's trace (a head count) or state (a counter forward updates, a flag set
    after construction): the save goes ahead with a warning naming it."""
    model = HeadsNet(heads=2).eval()
    with pytest.warns(UserWarning, match="differs: h is 4 rebuilt, 2 in the model; if these shape what the model computes"):
        ts.save(model, tmp_path / "h.safetensors")
    counting = Counting()
    counting(torch.randn(2, 4))
    with pytest.warns(UserWarning, match="calls is 0 rebuilt, 1 in the model"):
        path = ts.save(counting, tmp_path / "c.safetensors")
    x = torch.randn(2, 4)
    assert torch.equal(ts.load(path, trust_factory=True)(x), counting(x))


def test_corrupt_and_truncated_files(tmp_path):
    path = ts.save(ts.models.create("lenet-300-100"), tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="SHA-256"):
        ts.load(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ChecksumError, match="corrupt or truncated"):
        ts.load(path)


def test_refuses_to_overwrite_when_asked(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(TorchslimError, match="refusing to overwrite"):
        save_model(ts.models.create("lenet-300-100"), path, overwrite=False)
    assert path.read_bytes() == b"keep me"


def test_weights_mismatch_names_the_tensor(tmp_path):
    model = ts.models.create("lenet-300-100")
    path = save_model(model, tmp_path / "m.safetensors", spec={"name": "lenet-300-100", "kwargs": {"hidden": [200, 100]}})
    with pytest.raises(TorchslimError, match=r"fc1\.weight is stored as torch.float32 \(300, 784\), the architecture holds torch.float32 \(200, 784\)"):
        ts.load(path)


def test_pt_files_load_weights_only(tmp_path):
    model = ts.models.create("lenet-300-100")
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, plain)
    state = load_weights(plain)
    assert torch.equal(state["fc1.weight"], model.fc1.weight)

    pickled = tmp_path / "module.pt"
    torch.save(UserNet(), pickled)
    with pytest.raises(TorchslimError, match="refused to unpickle"):
        load_weights(pickled)
    assert "body.0.weight" in load_weights(pickled, trusted=True)


def test_unknown_registry_name_in_spec():
    with pytest.raises(TorchslimError, match="unknown model 'alexnet'"):
        build_from_spec({"name": "alexnet", "kwargs": {}})


@dataclasses.dataclass
class Scales:
    width: int = 8
    residual: float = 1.0


class ConfiguredNet(nn.Module):
    """A config dataclass and a dict keyed by integers as constructor arguments, held as attributes."""

    def __init__(self, cfg: Scales = Scales(), widths: dict | None = None) -> None:
        super().__init__()
        self.cfg, self.widths = cfg, widths or {0: 8}
        self.fc = nn.Linear(8, self.widths[0])

    def forward(self, x):
        return self.fc(x) * self.cfg.residual


def build_configured(residual: float = 1.0) -> ConfiguredNet:
    return ConfiguredNet(Scales(residual=residual))


def test_arguments_json_cannot_write_back_are_refused_not_swapped_for_their_defaults(tmp_path):
    """A config dataclass other than its default was taken for the default: the reloaded model scaled by 1.0, not
    3.0 (0.93 off), with no warning. A dict keyed by integers saved, and the file then failed to load (KeyError: 0)."""
    x = torch.randn(2, 8)
    plain = ConfiguredNet()
    assert torch.equal(ts.load(ts.save(plain, tmp_path / "p.safetensors"), trust_factory=True)(x), plain(x))  # its defaults: fine
    with pytest.raises(TorchslimError, match=r"cfg is Scales\(width=8, residual=3.0\) in the model, a value JSON cannot write back"):
        ts.save(ConfiguredNet(Scales(residual=3.0)), tmp_path / "c.safetensors")
    with pytest.raises(TorchslimError, match=r"widths is \{0: 8, 1: 4\} in the model"):
        ts.save(ConfiguredNet(widths={0: 8, 1: 4}), tmp_path / "w.safetensors")
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "w.safetensors").exists()
    scaled = build_configured(3.0)
    path = ts.save(scaled, tmp_path / "b.safetensors", factory="tests.io.test_modelfile:build_configured", kwargs={"residual": 3.0})
    assert torch.equal(ts.load(path, trust_factory=True)(x), scaled(x))
