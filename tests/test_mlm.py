"""MLM masking statistics (±4σ from the binomial), invariants, and the sparse head vs HF's dense loss."""

import math

import pytest
import torch

from helpers import make_tokenizer, packed_examples, tiny_model_config
from objectives import IGNORE_INDEX, get_objective


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    return [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 400, length=64))]


def within_4_sigma(count, n, p):
    sigma = math.sqrt(n * p * (1 - p))
    return abs(count - n * p) <= 4 * sigma, f"{count} vs {n * p:.1f} ± {4 * sigma:.1f}"


def test_bernoulli_selection_and_80_10_10(tok, examples):
    obj = get_objective("mlm", tok)
    batch = obj.collate(examples)
    original = torch.tensor([e["input_ids"] for e in examples])
    special = obj.special_token_mask[original]
    selected = batch["labels"] != IGNORE_INDEX
    assert not (selected & special).any(), "a special token was selected"
    assert torch.equal(batch["labels"][selected], original[selected])
    assert torch.equal(batch["input_ids"][~selected], original[~selected]), "unselected tokens must be untouched"
    ok, msg = within_4_sigma(int(selected.sum()), int((~special).sum()), 0.15)
    assert ok, msg
    s = int(selected.sum())
    got = batch["input_ids"][selected]
    n_mask = int((got == tok.mask_token_id).sum())
    ok, msg = within_4_sigma(n_mask, s, 0.8)
    assert ok, msg
    # a random replacement equals the original with probability 1/V' (V' = non-special vocabulary)
    v = len(obj.random_token_ids)
    changed = int(((got != tok.mask_token_id) & (got != original[selected])).sum())
    ok, msg = within_4_sigma(changed, s, 0.1 * (1 - 1 / v))
    assert ok, msg
    assert not obj.special_token_mask[got[got != tok.mask_token_id]].any(), "random tokens must be non-special"


def test_static_count_is_exact(tok, examples):
    obj = get_objective("mlm", tok, static_count=True)
    batch = obj.collate(examples[:50])
    for row, ex in zip(batch["labels"], examples[:50]):
        n = sum(1 for t in ex["input_ids"] if t not in tok.all_special_ids)
        assert int((row != IGNORE_INDEX).sum()) == round(0.15 * n)


@pytest.mark.parametrize("static", [False, True])
def test_whole_word_masks_all_pieces(tok, examples, static):
    obj = get_objective("mlm", tok, whole_word=True, static_count=static)
    batch = obj.collate(examples)
    n_words = n_sel_words = 0
    for row, ex in zip(batch["labels"], examples):
        words = torch.tensor(ex["word_ids"])
        sel = row != IGNORE_INDEX
        for w in torch.unique(words[words >= 0]):
            pieces = sel[words == w]
            assert pieces.all() or not pieces.any(), "a word was partly selected"
            n_words += 1
            n_sel_words += int(pieces.all())
        if static:
            n = int((words >= 0).sum())
            assert int(sel.sum()) <= round(0.15 * n)
    if not static:
        ok, msg = within_4_sigma(n_sel_words, n_words, 0.15)
        assert ok, msg


def test_masking_is_seeded_by_sample_index(tok, examples):
    obj = get_objective("mlm", tok, seed=3)
    a = obj.collate(examples[:8])
    b = obj.collate(examples[4:8])  # the same samples in another batch give the same masks
    assert torch.equal(a["input_ids"][4:], b["input_ids"]) and torch.equal(a["labels"][4:], b["labels"])
    c = get_objective("mlm", tok, seed=4).collate(examples[:8])
    assert not torch.equal(a["labels"], c["labels"])


def test_hf_collator_statistics_agree(tok, examples):
    """Our default selection rate matches DataCollatorForLanguageModeling's within ±4σ of each other's counts."""
    from transformers import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    hf = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)([{"input_ids": e["input_ids"]} for e in examples])
    ours = get_objective("mlm", tok).collate(examples)
    n_hf, n_ours = int((hf["labels"] != IGNORE_INDEX).sum()), int((ours["labels"] != IGNORE_INDEX).sum())
    n = sum(1 for e in examples for t in e["input_ids"] if t not in tok.all_special_ids)
    sigma = math.sqrt(2 * n * 0.15 * 0.85)  # std of the difference of two independent binomials
    assert abs(n_hf - n_ours) <= 4 * sigma


def test_sparse_head_equals_hf_dense_loss(tok, examples):
    torch.manual_seed(0)
    obj = get_objective("mlm", tok)
    model = obj.build_model(tiny_model_config()).eval()
    batch = obj.collate(examples[:6])
    out = obj(model, batch)
    dense = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.allclose(out["loss"], dense.loss, atol=1e-5)
    assert out["n_masked"] == (batch["labels"] != IGNORE_INDEX).sum()


def test_normalizers_make_the_loss_token_exact(tok, examples):
    """Two halves normalised by the total count sum to the loss of the whole batch."""
    torch.manual_seed(0)
    obj = get_objective("mlm", tok)
    model = obj.build_model(tiny_model_config()).eval()
    whole = obj.collate(examples[:8])
    halves = [obj.collate(examples[:3]), obj.collate(examples[3:8])]
    norm = {"n_masked": sum(obj.counts(h)["n_masked"] for h in halves)}
    total = sum(obj(model, h, norm)["loss"] for h in halves)
    assert torch.allclose(total, obj(model, whole)["loss"], atol=1e-5)


def test_bad_options_name_the_closest_key(tok):
    with pytest.raises(ValueError, match="mask_ratio"):
        get_objective("mlm", tok, mask_ration=0.2)
    with pytest.raises(ValueError, match="did you mean 'mlm'"):
        get_objective("mlmm", tok)
