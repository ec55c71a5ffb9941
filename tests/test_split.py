"""The split protocol (objectives.base): pretrain/decouple/ and pretrain/fast.py name no objective and reach into no
model's attributes (checked on their source with ``ast``, and the check is shown to catch a planted violation); every
registered objective implements the protocol, and its pieces recompose into the objective's own loss."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import make_tokenizer, packed_examples, tiny_model_config
from objectives import OBJECTIVES, Objective, get_objective, objective_class
from pretrain.decouple import modes

ROOT = Path(__file__).parent.parent
AGNOSTIC = [*sorted((ROOT / "pretrain" / "decouple").glob("*.py")), ROOT / "pretrain" / "fast.py"]
#: attributes of the stock models that only an objective may know
MODEL_ATTRIBUTES = {"bert", "electra", "generator", "discriminator", "cls"}


def violations(source: str) -> list[str]:
    """Objective names as string literals and model-specific attribute accesses in ``source``, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in OBJECTIVES:
            found.append(f"{node.lineno}: objective name {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in MODEL_ATTRIBUTES:
            found.append(f"{node.lineno}: attribute .{node.attr}")
    return found


def test_the_check_catches_planted_violations():
    planted = 'def f(model, objective):\n    if objective.name == "electra":\n        return model.discriminator\n' \
              '    return model.bert.embeddings, model.cls\n'
    assert len(violations(planted)) == 4
    assert violations('def f(model, objective):\n    """Cuts the mlm model."""\n    return objective.encoders(model)\n') == []


@pytest.mark.parametrize("path", AGNOSTIC, ids=lambda p: p.name)
def test_decoupling_and_fast_path_are_objective_agnostic(path):
    assert violations(path.read_text()) == [], f"{path.relative_to(ROOT)} knows an objective"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def owned(module: nn.Module, model: nn.Module) -> bool:
    return any(module is m for m in model.modules())


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_the_protocol_is_complete_and_recomposes_the_objective_loss(tokenizer, name):
    objective = get_objective(name, tokenizer, seed=0)
    objective.set_unigram_counts(torch.ones(len(tokenizer)))
    torch.manual_seed(0)
    model = objective.build_model(tiny_model_config()).eval()
    batch = objective.collate([dict(e, index=i) for i, e in enumerate(packed_examples(tokenizer, 3, length=32))])
    assert batch["padded"] is False  # no attention mask anywhere: the pieces and the objective see the same network

    encoders = objective.encoders(model)
    assert encoders and all(owned(e, model) and isinstance(e.encoder.layer, nn.ModuleList) for e in encoders)
    layers, config = objective.layers(model), objective.split_config(model)
    assert len(layers) == config.num_hidden_layers and all(owned(layer, model) for layer in layers)
    assert modes.unsupported(type(objective), "local") is None
    assert all(isinstance(k, str) and isinstance(v, torch.dtype) for k, v in objective.carry.items())

    with torch.no_grad():
        stem, final = objective.stem(model), objective.final_head(model)
        hidden, carry, sums, counts, metrics = stem(batch)
        assert hidden.shape == (*batch["input_ids"].shape, config.hidden_size)
        assert {k: v.dtype for k, v in carry.items()} == objective.carry
        assert all(v.shape == batch["input_ids"].shape for v in carry.values())
        assert sums.keys() == stem.loss_parts.keys() and set(metrics) <= set(stem.metric_counts)
        for layer in layers:
            hidden = layer(hidden, None)
        head_sums, head_counts, head_metrics = final(hidden, None, batch, carry)
        assert head_sums.keys() == final.loss_parts.keys() and set(head_metrics) <= set(final.metric_counts)
        parts = {**stem.loss_parts, **final.loss_parts}
        assert parts == objective.loss_parts
        out = objective.reduce({**sums, **head_sums}, {**counts, **head_counts}, None, {**metrics, **head_metrics},
                               parts=parts)
        assert torch.equal(out["loss"], objective(model, batch)["loss"])

        for extra_layer in (False, True):
            aux = objective.aux_head(config, extra_layer)
            assert not {id(p) for p in aux.parameters()} & {id(p) for p in model.parameters()}
            aux_sums, _, aux_metrics = aux(hidden, None, batch, carry)
            assert aux_sums.keys() == aux.loss_parts.keys() and set(aux_metrics) <= set(aux.metric_counts)

    if modes.unsupported(type(objective), "synthetic") is None:
        words = objective.input_embeddings(model)
        assert words.shape == (config.vocab_size, config.hidden_size)
        assert any(words is p for p in model.parameters())
        assert objective.synthetic_count_key in objective.counts(batch)
    objective.prepare_split(model, 2)
    copied = objective.export_copy(model)
    assert copied is not model and copied.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), model.state_dict().values()))


def test_a_mode_names_the_protocol_members_it_needs():
    """ELECTRA has no masked-label table or target count for synthetic gradients; MLM and SpanBERT provide both."""
    assert modes.missing(objective_class("electra"), "synthetic") == ["input_embeddings", "synthetic_count_key"]
    assert modes.missing(objective_class("electra"), "local") == []
    assert all(modes.missing(objective_class(n), m) == [] for n in ("mlm", "span") for m in ("local", "synthetic"))
    assert modes.missing(Objective, "local") == list(
        modes.stage_class("local").requires)
