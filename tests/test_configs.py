"""Every typed config refuses a bad field by name and an unknown key by name (generator.models.config), and the
causal and title designs share one backbone config."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

import pytest

from generator.models.causal import CausalConfig
from generator.models.config import BACKBONE_KEYS, BackboneConfig
from generator.models.titles import TitleConfig
from generator.runs.options import TrainOptions
from generator.t5.model import GeneratorConfig
from generator.training.distill_options import DistillOptions
from semid_cli.args import add_fields, fields_given


@pytest.mark.parametrize(("cls", "field", "value", "message"), [
    (CausalConfig, "dropout", 1.0, r"`dropout` must be in \[0, 1\), got 1.0"),
    (CausalConfig, "dropout", -0.1, r"`dropout` must be in \[0, 1\)"),
    (CausalConfig, "item_dropout", True, r"`item_dropout` must be in \[0, 1\), got True"),
    (CausalConfig, "num_layers", 0, r"`num_layers` must be a positive int, got 0"),
    (CausalConfig, "members", 2.0, r"`members` must be a positive int, got 2.0"),
    (CausalConfig, "dense_dim", -1, r"`dense_dim` must be a non-negative int, got -1"),
    (CausalConfig, "id_input", 1, r"`id_input` must be a bool, got 1"),
    (CausalConfig, "num_heads", 3, r"`d_model` \(64\) must be a multiple of `num_heads` \(3\)"),
    (TitleConfig, "max_history", True, r"`max_history` must be a positive int, got True"),
    (TitleConfig, "title_dropout", 1.5, r"`title_dropout` must be in \[0, 1\)"),
    (TitleConfig, "vocab_size", -2, r"`vocab_size` must be a non-negative int, got -2"),
    (GeneratorConfig, "d_kv", 0, r"`d_kv` must be a positive int, got 0"),
    (GeneratorConfig, "dropout", 1.0, r"`dropout` must be in \[0, 1\)"),
    (DistillOptions, "val_users", 0, r"`val_users` must be a positive int, got 0"),
    (DistillOptions, "label_smoothing", 1.0, r"`label_smoothing` must be in \[0, 1\)"),
])
def test_a_bad_field_is_refused_by_name(cls: type, field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**{field: value})
    cls()  # the defaults are valid


@pytest.mark.parametrize(("cls", "what", "known"), [
    (CausalConfig, "causal config keys", "max_history"), (TitleConfig, "title config keys", "max_history"),
    (GeneratorConfig, "generator config keys", "d_model"), (TrainOptions, "training options", "max_history")])
def test_an_unknown_key_is_refused_by_name_with_the_known_ones(cls: type, what: str, known: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown {what} \['d_modle'\]; known: \[.*'{known}'"):
        cls.from_dict({"d_modle": 32})


def test_a_config_reads_back_what_it_wrote_and_its_design_name_is_not_a_field() -> None:
    for config in (CausalConfig(d_model=32, num_heads=4, dense_dim=32, id_input=True, members=2), TitleConfig(title_dim=8)):
        written = config.to_dict()
        assert written["design"] in ("causal", "title")
        assert type(config).from_dict(written) == config


def test_the_causal_and_title_designs_share_the_backbone_fields() -> None:
    assert BACKBONE_KEYS == ("d_model", "num_layers", "num_heads", "d_ff", "dropout", "max_history")
    for cls in (CausalConfig, TitleConfig):
        assert issubclass(cls, BackboneConfig)
        assert tuple(f.name for f in fields(cls))[: len(BACKBONE_KEYS)] == BACKBONE_KEYS  # written first, as before
    title = TitleConfig(d_model=32, num_layers=3, num_heads=4, d_ff=64, dropout=0.1, max_history=20)
    backbone = title.backbone()
    assert {k: getattr(backbone, k) for k in BACKBONE_KEYS} == {k: getattr(title, k) for k in BACKBONE_KEYS}
    assert backbone.dense_dim == 0 and not backbone.node_vectors


@dataclass(frozen=True)
class _Flags:
    count: int = field(default=1200, metadata={"help": "how many"})
    rate: float = field(default=0, metadata={"help": "a float whose default is written as an int"})
    name: str | None = field(default=None, metadata={"help": "optional"})
    on: bool = field(default=True, metadata={"help": "a switch"})


def test_flags_derived_from_fields_parse_as_the_field_types_and_show_the_defaults() -> None:
    p = argparse.ArgumentParser()
    add_fields(p, _Flags)
    helps = {a.dest: a.help for a in p._actions}
    assert helps["count"] == "how many (default 1,200)" and helps["name"] == "optional (default none)"
    args = p.parse_args(["--rate", "0.25", "--no-on", "--name", "x"])
    assert fields_given(_Flags, args) == {"rate": 0.25, "on": False, "name": "x"}  # count not given: the default's
    assert _Flags(**fields_given(_Flags, p.parse_args([]))) == _Flags()
    p = argparse.ArgumentParser()
    add_fields(p, DistillOptions)
    assert DistillOptions(**fields_given(DistillOptions, p.parse_args(["--val-users", "20", "--lr", "1e-3"]))) == \
        DistillOptions(val_users=20, lr=1e-3)

    @dataclass(frozen=True)
    class NoHelp:
        n: int = 1

    with pytest.raises(TypeError, match=r"NoHelp.n: a flag needs .* metadata\['help'\]"):
        add_fields(argparse.ArgumentParser(), NoHelp)
