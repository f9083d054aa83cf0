"""Null ``target_modules``: PEFT's table where it has the model type, else query / value."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import (
    AutoModelForImageClassification,
    AutoModelForQuestionAnswering,
    BertConfig,
    PretrainedConfig,
    ViTConfig,
)

from app.adapters.stella import StellaConfig
from app.adapters.targets import default_query_value_targets, with_default_targets
from app.errors import ConfigError


def _vit() -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForImageClassification.from_config(ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            image_size=32, patch_size=8, num_labels=3))


def _bert_qa() -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForQuestionAnswering.from_config(BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64))


class _Mystery(torch.nn.Module):
    """A model type PEFT does not know, without query / value layers."""

    def __init__(self) -> None:
        super().__init__()
        self.config = PretrainedConfig()
        self.config.model_type = "mystery"
        self.mix = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 2)


@pytest.mark.parametrize("make", [lambda: LoraConfig(r=4), lambda: StellaConfig(r=4)])
def test_vit_null_targets_become_q_v_proj(make) -> None:
    given = make()
    adapter = with_default_targets(_vit(), given)
    assert list(adapter.target_modules) == ["q_proj", "v_proj"]
    assert given.target_modules is None  # the user's config is not changed


def test_peft_table_and_explicit_targets_are_left_alone() -> None:
    bert = LoraConfig(r=4)
    bert = with_default_targets(_bert_qa(), bert)  # "bert" is in PEFT's table: PEFT resolves it
    assert bert.target_modules is None
    listed = StellaConfig(r=4, target_modules=["q_proj"])
    assert with_default_targets(_vit(), listed) is listed
    assert listed.target_modules == ["q_proj"]
    assert with_default_targets(_vit(), None) is None  # full fine-tuning: nothing to fill


def test_unknown_model_without_query_value_is_a_config_error() -> None:
    assert default_query_value_targets(_Mystery()) is None
    with pytest.raises(ConfigError, match=r"target_modules is null.*'mystery'.*_Mystery.*"
                                          r"list target_modules explicitly"):
        with_default_targets(_Mystery(), LoraConfig(r=4))


def test_query_value_pairs_are_found_on_bert_names() -> None:
    assert default_query_value_targets(_bert_qa()) == ["query", "value"]
