from dataclasses import dataclass
from typing import Literal

import pytest

from torchslim.core.config import Config, ConfigError, check


@dataclass(frozen=True)
class Inner(Config):
    bits: int = 8
    symmetric: bool = True


@dataclass(frozen=True)
class Outer(Config):
    sparsity: float = 0.5
    method: Literal["magnitude", "random"] = "magnitude"
    layers: tuple[str, ...] = ()
    inner: Inner = Inner()
    limit: int | None = None

    def validate(self) -> None:
        check(0 <= self.sparsity < 1, f"sparsity must be in [0, 1), got {self.sparsity}")


def test_from_dict_types_and_defaults():
    config = Outer.from_dict({"sparsity": 0, "layers": ["fc*"], "inner": {"bits": 4}})
    assert config.sparsity == 0.0 and isinstance(config.sparsity, float)
    assert config.layers == ("fc*",)
    assert config.inner == Inner(bits=4)
    assert config.limit is None


def test_unknown_key_names_key_and_place():
    with pytest.raises(ConfigError, match=r"Outer\.inner: unknown key 'bitz'"):
        Outer.from_dict({"inner": {"bitz": 4}})


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"sparsity": "high"}, r"Outer\.sparsity: expected a number"),
        ({"method": "l3"}, r"Outer\.method: expected one of"),
        ({"layers": "fc1"}, r"Outer\.layers: expected list"),
        ({"inner": {"symmetric": 1}}, r"Outer\.inner\.symmetric: expected true or false"),
        ({"limit": 1.5}, r"Outer\.limit"),
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ],
)
def test_wrong_values_are_errors(mapping, message):
    with pytest.raises(ConfigError, match=message):
        Outer.from_dict(mapping)


def test_yaml_and_json_round_trip():
    config = Outer(sparsity=0.9, method="random", layers=("a", "re:b.*"), inner=Inner(bits=3, symmetric=False), limit=7)
    assert Outer.from_yaml(config.to_yaml()) == config
    assert Outer.from_json(config.to_json()) == config


def test_replace_validates_again():
    config = Outer()
    assert config.replace(sparsity=0.7).sparsity == 0.7
    with pytest.raises(ConfigError):
        config.replace(sparsity=2.0)
