"""The config convention (archlab.config) and the error helpers (archlab.errors).

Checked: frozen dataclasses validated on construction, JSON round trip, unknown keys rejected with
the closest valid name, and the message style (field, value, what is allowed).
"""

import dataclasses

import pytest

from archlab.config import Config, check_choice, check_divisible, check_positive, check_probability
from archlab.errors import ArchlabError, ConfigError, closest, unknown
from archlab.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class ToyConfig(Config):
    d_model: int = 8
    n_heads: int = 2
    dropout: float = 0.1
    kind: str = "relu"
    sizes: tuple[int, ...] = (1, 2)

    def validate(self) -> None:
        check_positive("d_model", self.d_model)
        check_divisible("d_model", self.d_model, "n_heads", self.n_heads)
        check_probability("dropout", self.dropout)
        check_choice("kind", self.kind, ["relu", "gelu"])


def test_json_round_trip_preserves_every_field(tmp_path):
    cfg = ToyConfig(d_model=12, n_heads=3, dropout=0.0, kind="gelu", sizes=(4, 5, 6))
    assert ToyConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path / "c.json")
    assert ToyConfig.load(tmp_path / "c.json") == cfg


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ToyConfig().d_model = 4


def test_validation_names_field_value_and_rule():
    with pytest.raises(ConfigError, match=r"d_model=500 is not divisible by n_heads=8"):
        ToyConfig(d_model=500, n_heads=8)
    with pytest.raises(ConfigError, match=r"dropout=1.5 must be in \[0, 1\)"):
        ToyConfig(dropout=1.5)
    with pytest.raises(ConfigError, match=r"d_model=0 must be > 0"):
        ToyConfig(d_model=0)
    with pytest.raises(ConfigError, match=r"unknown value 'gelo' \(did you mean 'gelu'\?\)"):
        ToyConfig(kind="gelo")


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'd_modle' \(did you mean 'd_model'\?\)"):
        ToyConfig.from_dict({"d_modle": 4})
    with pytest.raises(ConfigError, match="did you mean 'n_heads'"):
        ToyConfig().replace(n_head=4)


def test_replace_validates_again():
    assert ToyConfig().replace(d_model=16).d_model == 16
    with pytest.raises(ConfigError):
        ToyConfig().replace(d_model=7)


def test_from_json_refuses_other_class():
    text = ToyConfig().to_json().replace('"ToyConfig"', '"OtherConfig"')
    with pytest.raises(ConfigError, match="is a OtherConfig, not a ToyConfig"):
        ToyConfig.from_json(text)


def test_errors_are_archlab_and_builtin():
    assert issubclass(ConfigError, ArchlabError) and issubclass(ConfigError, ValueError)
    assert closest("gpt2-smal", ["gpt2-small", "bert-base"]) == " (did you mean 'gpt2-small'?)"
    assert closest("zzzz", ["gpt2-small"]) == ""
    assert unknown("preset", "x", ["b", "a"]).endswith("known: a, b")


def test_field_types_are_checked_before_validation():
    with pytest.raises(ConfigError, match=r"d_model='abc' must be an integer"):
        ToyConfig(d_model="abc")
    with pytest.raises(ConfigError, match=r"d_model=True must be an integer"):
        ToyConfig(d_model=True)
    with pytest.raises(ConfigError, match=r"d_model=8.5 must be an integer"):
        ToyConfig(d_model=8.5)
    with pytest.raises(ConfigError, match=r"kind=3 must be a string"):
        ToyConfig(kind=3)
    assert ToyConfig(dropout=0).dropout == 0  # an int is a fine float
    assert ToyConfig.from_dict({"sizes": [3, 4]}).sizes == (3, 4)  # JSON lists become tuples
    with pytest.raises(ConfigError, match=r"sizes=\('a',\) must be a list"):
        ToyConfig(sizes=("a",))


def test_a_list_of_the_wrong_length_says_how_many_items_and_of_what():
    """TrainConfig(betas=(0.9,)) said only "must be a list", though it is one: one item short."""
    with pytest.raises(ConfigError, match=r"^betas=\(0\.9,\) must be a list of 2 \(a number, a number\)$"):
        TrainConfig(betas=(0.9,))
