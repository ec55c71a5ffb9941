"""ELECTRA: shared embeddings, gradient isolation, replaced labels, masking statistics, Gumbel sampling, export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from objectives import IGNORE_INDEX, get_objective
from objectives.electra import (
    ElectraConfig,
    ElectraObjective,
    ElectraPretrainingModel,
    _mix32,
    _words,
    generator_shape,
    gumbel_noise,
    gumbel_sample,
)
from pretrain.config import ModelConfig, load_config
from pretrain.hf_io import roundtrip_check

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
N_WORDS = 200


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny WordPiece tokenizer built in memory (never BertTokenizer(vocab_file=...): v5 ignores the file)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(N_WORDS)])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return BertTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_model_config(**overrides) -> ModelConfig:
    options = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=64,
                   hidden_dropout=0.0, attention_dropout=0.0)
    options.update(overrides)
    return ModelConfig(**options)


def build(tokenizer, seed=0, model_seed=0, **options):
    obj = get_objective("electra", tokenizer, seed=seed, **options)
    torch.manual_seed(model_seed)
    return obj, obj.build_model(tiny_model_config())


def random_examples(n, length=24, seed=0, start_index=0):
    """Blocks [CLS] words [SEP] words [SEP] (two packed documents) with a global sample index each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = (torch.randint(0, N_WORDS, (length - 3,), generator=g) + len(SPECIALS)).tolist()
        cut = len(words) // 2
        out.append({"input_ids": [2] + words[:cut] + [3] + words[cut:] + [3], "index": start_index + i})
    return out


# ---------------------------------------------------------------------------------------------------- model


def test_config_validation_and_unknown_option(tokenizer):
    for bad in ({"mask_ratio": 0.0}, {"mask_token_prob": 1.5}, {"temperature": 0.0}, {"generator_size": 0.0},
                {"disc_weight": -1.0}):
        with pytest.raises(ValueError, match="objective.electra"):
            ElectraConfig(**bad)
    with pytest.raises(ValueError, match="did you mean 'disc_weight'"):
        get_objective("electra", tokenizer, disc_weigth=10.0)


def test_generator_shape_follows_the_reference():
    assert generator_shape(64, 0.25) == (16, 1, 64)
    assert generator_shape(256, 0.25) == (64, 1, 256)  # ELECTRA-Small
    assert generator_shape(768, 0.333) == (256, 4, 1024)  # ELECTRA-Base, 1/3
    assert generator_shape(1024, 0.25) == (256, 4, 1024)  # ELECTRA-Large
    with pytest.raises(ValueError, match="generator_size"):
        generator_shape(768, 0.3)  # hidden 230 with 3 heads


@pytest.mark.parametrize("embedding_size", [None, 32])
def test_embeddings_are_shared_objects_and_lm_head_is_tied(tokenizer, embedding_size):
    obj = get_objective("electra", tokenizer)
    assert isinstance(obj, ElectraObjective) and obj.name == "electra"
    model = obj.build_model(tiny_model_config(embedding_size=embedding_size))
    gen, disc = model.generator, model.discriminator
    assert isinstance(model, ElectraPretrainingModel)
    assert type(gen).__name__ == "ElectraForMaskedLM" and type(disc).__name__ == "ElectraForPreTraining"
    assert (gen.config.hidden_size, gen.config.num_attention_heads, gen.config.intermediate_size) == (16, 1, 64)
    assert gen.config.num_hidden_layers == disc.config.num_hidden_layers == 2
    ge, de = gen.electra.embeddings, disc.electra.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"):
        assert getattr(ge, name) is getattr(de, name)
    for (n1, p1), (n2, p2) in zip(ge.named_parameters(), de.named_parameters()):
        assert n1 == n2 and p1 is p2
    assert gen.generator_lm_head.weight is de.word_embeddings.weight
    emb = embedding_size or 64
    assert gen.electra.embeddings_project.in_features == emb and gen.electra.embeddings_project.out_features == 16
    assert hasattr(disc.electra, "embeddings_project") == (emb != 64)
    assert gen.generator_predictions.dense.out_features == emb
    # each shared tensor is counted once
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))


def test_sparse_generator_head_equals_the_stock_forward(tokenizer):
    obj, model = build(tokenizer)
    model.eval()
    batch = obj.collate(random_examples(3))
    selected = batch["labels"] != IGNORE_INDEX
    gen = model.generator
    with torch.no_grad():
        full = gen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden = gen.electra(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        sparse = gen.generator_lm_head(gen.generator_predictions(hidden[selected]))
    torch.testing.assert_close(sparse, full[selected], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- gradients


def _grads(module, skip=()):
    skip_ids = {id(p) for p in skip}
    return {n: p.grad for n, p in module.named_parameters() if id(p) not in skip_ids}


def test_shared_embeddings_get_gradient_from_each_loss(tokenizer):
    obj, model = build(tokenizer)
    batch = obj.collate(random_examples(4))
    for part in ("gen_loss", "disc_loss"):
        model.zero_grad(set_to_none=True)
        sums, _, _, _ = obj.loss_sums(model, batch)
        sums[part].backward()
        for name, p in model.discriminator.electra.embeddings.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{part} gives no gradient to shared {name}"


def test_disc_loss_sends_no_gradient_into_the_generator(tokenizer):
    obj, model = build(tokenizer)
    batch = obj.collate(random_examples(4))
    sums, counts, _, _ = obj.loss_sums(model, batch)
    assert counts["n_replaced"] > 0
    sums["disc_loss"].backward()
    own = _grads(model.generator, skip=model.shared_parameters())
    assert "electra.encoder.layer.0.attention.self.query.weight" in own and "generator_lm_head.bias" in own
    for name, grad in own.items():
        assert grad is None or torch.count_nonzero(grad) == 0, f"disc loss reached generator parameter {name}"
    # and the generator loss reaches neither the discriminator's own parameters
    model.zero_grad(set_to_none=True)
    obj.loss_sums(model, batch)[0]["gen_loss"].backward()
    for name, grad in _grads(model.discriminator, skip=model.shared_parameters()).items():
        assert grad is None or torch.count_nonzero(grad) == 0, f"gen loss reached discriminator parameter {name}"


# ---------------------------------------------------------------------------------------------------- labels


def test_replaced_labels_are_exactly_sample_differs_from_original(tokenizer, monkeypatch):
    obj, model = build(tokenizer)
    batch = obj.collate(random_examples(6))
    selected = batch["labels"] != IGNORE_INDEX
    _, counts, _, aux = obj.loss_sums(model, batch)
    original = batch["original_ids"]
    assert torch.equal(aux["disc_input_ids"][selected], aux["sampled"])
    assert torch.equal(aux["disc_input_ids"][~selected], original[~selected])
    assert torch.equal(aux["replaced"], aux["disc_input_ids"] != original)
    assert counts["n_replaced"] == int((aux["sampled"] != original[selected]).sum())

    # forced: the sampler returns the original token at every other masked position
    targets = batch["labels"][selected]
    keep = torch.arange(len(targets)) % 2 == 0
    other = torch.where(targets == len(tokenizer) - 1, targets - 1, targets + 1)
    monkeypatch.setattr(obj, "sample", lambda logits, b, index, length: torch.where(keep, targets, other))
    _, counts, _, aux = obj.loss_sums(model, batch)
    expected = torch.zeros_like(selected)
    expected[selected] = ~keep
    assert torch.equal(aux["replaced"], expected)
    assert counts["n_replaced"] == int((~keep).sum()) and counts["n_original"] == counts["n_tokens"] - (~keep).sum()


def test_generator_sampling_the_original_is_labelled_original(tokenizer):
    """Through the real generator and sampler: all mass on one token id."""
    obj, model = build(tokenizer)
    t, u = len(SPECIALS) + 3, len(SPECIALS) + 4
    batch = obj.collate([{"input_ids": [2] + [t] * 30 + [3], "index": i} for i in range(4)])
    bias = model.generator.generator_lm_head.bias
    with torch.no_grad():
        bias[t] = 1e4
    out = obj(model, batch)
    assert out["n_masked"] > 0 and out["n_replaced"] == 0 and out["replaced_frac"] == 0
    assert out["n_original"] == out["n_tokens"]
    with torch.no_grad():
        bias[t], bias[u] = 0.0, 1e4
    _, counts, _, aux = obj.loss_sums(model, batch)
    assert counts["n_replaced"] == counts["n_masked"]
    assert torch.equal(aux["replaced"], batch["labels"] != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------- masking


def test_masking_statistics(tokenizer):
    obj = get_objective("electra", tokenizer, seed=3)
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(1500):
        length = int(torch.randint(8, 64, (1,), generator=g))
        ids = (torch.randint(0, N_WORDS, (length,), generator=g) + len(SPECIALS))
        ids[torch.rand(length, generator=g) < 0.05] = tokenizer.unk_token_id  # specials inside the block too
        ids[0], ids[length // 2], ids[-1] = 2, 3, 3
        examples.append({"input_ids": ids.tolist(), "index": i})
    total_masked = total_mask_token = 0
    for start in range(0, len(examples), 100):
        chunk = examples[start:start + 100]
        batch = obj.collate(chunk)
        special = obj.special_token_mask[batch["original_ids"]]
        selected = batch["labels"] != IGNORE_INDEX
        assert not (selected & special).any(), "a special token was masked"
        assert not (selected & (batch["attention_mask"] == 0)).any()
        for row, example in enumerate(chunk):
            n = int((~special[row] & (batch["attention_mask"][row] == 1)).sum())
            assert int(selected[row].sum()) == round(0.15 * n)
            length = len(example["input_ids"])
            assert batch["original_ids"][row, :length].tolist() == example["input_ids"]
            assert (batch["original_ids"][row, length:] == tokenizer.pad_token_id).all()
        assert torch.equal(batch["labels"][selected], batch["original_ids"][selected])
        assert torch.equal(batch["input_ids"][~selected], batch["original_ids"][~selected])
        is_mask = batch["input_ids"][selected] == tokenizer.mask_token_id
        assert torch.equal(batch["input_ids"][selected][~is_mask], batch["original_ids"][selected][~is_mask])
        assert torch.equal(batch["sample_index"], torch.tensor([e["index"] for e in chunk]))
        total_masked += int(selected.sum())
        total_mask_token += int(is_mask.sum())
    sigma = math.sqrt(total_masked * 0.85 * 0.15)
    assert total_masked > 5_000
    assert abs(total_mask_token - 0.85 * total_masked) < 4 * sigma


def test_masking_depends_on_the_sample_index_only(tokenizer):
    obj = get_objective("electra", tokenizer, seed=1)
    examples = random_examples(4, length=40)
    alone = obj.collate([examples[2]])
    together = obj.collate(list(reversed(examples)))
    for key in ("input_ids", "labels", "original_ids"):
        assert torch.equal(alone[key][0], together[key][1])
    # without an index the objective counts its own fallback indices
    fallback = obj.collate([{"input_ids": examples[0]["input_ids"]}] * 2)
    assert fallback["sample_index"].tolist() == [2**56, 2**56 + 1]


# ---------------------------------------------------------------------------------------------------- sampling


def test_gumbel_sample_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2])
    rows = 40_000
    index, position = torch.arange(rows), torch.full((rows,), 5)
    for temperature in (1.0, 0.5):
        draws = gumbel_sample(logits.expand(rows, -1), 11, index, position, temperature)
        freq = torch.bincount(draws, minlength=len(logits)).double() / rows
        p = torch.softmax(logits.double() / temperature, -1)
        sigma = (p * (1 - p) / rows).sqrt()
        assert ((freq - p).abs() <= 4 * sigma + 1e-12).all(), (temperature, freq, p)
    noise = gumbel_noise(0, torch.arange(2000), torch.arange(2000) % 128, 100).double()
    euler_gamma = 0.5772156649
    assert abs(noise.mean() - euler_gamma) < 4 * math.pi / math.sqrt(6 * noise.numel())
    assert abs(noise.var() - math.pi**2 / 6) < 0.02


def reference_lowbias32(x: int) -> int:
    """lowbias32 on a Python int (exact arithmetic, then reduced modulo 2**32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_int32_hash_matches_exact_arithmetic():
    """The int32 tensor hash (wrapping products, masked shifts) equals exact 32-bit arithmetic, all bit patterns."""
    gen = torch.Generator().manual_seed(0)
    words = torch.cat([torch.randint(0, 2**32, (5000,), generator=gen, dtype=torch.int64),
                       torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1])])
    low, high = _words(words + (words << 32))
    assert torch.equal(low.long() & 0xFFFFFFFF, words) and torch.equal(high.long() & 0xFFFFFFFF, words)
    hashed = _mix32(low).long() & 0xFFFFFFFF
    assert hashed.tolist() == [reference_lowbias32(w) for w in words.tolist()]


def test_gumbel_noise_has_no_correlation_across_rows_or_vocabulary():
    """Pairs of neighbouring rows (next sample index, same position) draw independently: their joint frequencies
    match p x p within 4 sigma; neighbouring vocabulary entries of a row are uncorrelated (|r| < 4 / sqrt(n))."""
    logits = torch.tensor([1.0, 0.0, -0.5, 0.5])
    rows = 40_000
    index = torch.arange(2 * rows)
    draws = gumbel_sample(logits.expand(2 * rows, -1), 3, index, torch.full((2 * rows,), 9)).view(rows, 2)
    joint = torch.bincount(draws[:, 0] * 4 + draws[:, 1], minlength=16).double() / rows
    p = torch.softmax(logits.double(), -1)
    p2 = (p[:, None] * p[None, :]).flatten()
    assert ((joint - p2).abs() <= 4 * (p2 * (1 - p2) / rows).sqrt()).all(), (joint, p2)

    noise = gumbel_noise(5, torch.arange(500), torch.arange(500) % 128, 400).double()
    for a, b in ((noise[:, :-1], noise[:, 1:]), (noise[:-1], noise[1:])):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(r) < 4 / math.sqrt(a.numel()), r


def test_gumbel_noise_is_a_function_of_seed_index_and_position(tokenizer):
    index, position = torch.tensor([7, 7, 8, 7]), torch.tensor([3, 4, 3, 3])
    noise = gumbel_noise(0, index, position, 50)
    assert torch.equal(noise[0], noise[3])
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(gumbel_noise(0, index[1:2], position[1:2], 50)[0], noise[1])
    assert not torch.equal(gumbel_noise(1, index, position, 50), noise)
    # large sample indices use their high bits too
    big = gumbel_noise(0, torch.tensor([5, 5 + 2**32]), torch.tensor([1, 1]), 50)
    assert not torch.equal(big[0], big[1])

    # the same sample draws the same replacements alone or in a batch of 4 (with padding)
    obj, model = build(tokenizer)
    model.eval()
    examples = random_examples(4, length=20, start_index=100)
    examples[0] = random_examples(1, length=32, seed=5, start_index=200)[0]
    alone = obj.collate([examples[1]])
    together = obj.collate(examples)
    with torch.no_grad():
        sampled_alone = obj.loss_sums(model, alone)[3]["sampled"]
        aux = obj.loss_sums(model, together)[3]
    selected = together["labels"] != IGNORE_INDEX
    row_of = torch.nonzero(selected)[:, 0]
    assert torch.equal(aux["sampled"][row_of == 1], sampled_alone)
    assert torch.equal(aux["disc_input_ids"][1, :20], obj.loss_sums(model, alone)[3]["disc_input_ids"][0])


# ---------------------------------------------------------------------------------------------------- loss / training


def test_reduction_is_token_exact(tokenizer):
    obj, model = build(tokenizer, disc_weight=7.0)
    assert obj.loss_parts == {"gen_loss": ("n_masked", 1.0), "disc_loss": ("n_tokens", 7.0)}
    batch = obj.collate(random_examples(3))
    counts = obj.counts(batch)
    assert set(counts) == {"n_masked", "n_tokens"}
    out = obj(model, batch)
    assert out["n_masked"] == counts["n_masked"] and out["n_tokens"] == counts["n_tokens"]
    assert out["n_replaced"] + out["n_original"] == out["n_tokens"]
    for metric, key in obj.metric_counts.items():
        assert metric in out and key in out
    torch.testing.assert_close(out["loss"], out["gen_loss"] + 7.0 * out["disc_loss"])
    normalizers = {"n_masked": torch.tensor(1000), "n_tokens": torch.tensor(5000)}
    windowed = obj(model, batch, normalizers)
    expected = out["gen_loss"] * counts["n_masked"] / 1000 + 7.0 * out["disc_loss"] * counts["n_tokens"] / 5000
    torch.testing.assert_close(windowed["loss"].detach(), expected)


def test_evaluation_reports_the_discriminator_auc(tokenizer):
    """In eval mode the loss dict carries the logits' histogram; the tracker turns it into the replaced-vs-original
    ROC AUC of the discriminator's logits (within the shared-bin bound). Training steps carry none."""
    from pretrain.metrics import ROC_PREFIX, MetricTracker

    obj, model = build(tokenizer)
    batch = obj.collate(random_examples(6, length=32))
    assert not any(k.startswith(ROC_PREFIX) for k in obj(model, batch))
    obj.eval()
    with torch.no_grad():
        out = obj(model, batch)
        logits, replaced = (obj.loss_sums(model, batch)[3][k] for k in ("disc_logits", "replaced"))
    tracker = MetricTracker(obj.metric_counts)
    tracker.add(out)
    auc = tracker.compute()["disc_auc"]
    valid = batch["attention_mask"].bool()
    pos, neg = logits[replaced & valid], logits[~replaced & valid]
    exact = float((pos[:, None] > neg[None, :]).double().mean())
    hist = out[ROC_PREFIX + "disc_auc"].double()
    bound = 0.5 * float((hist[0] * hist[1]).sum() / (hist[0].sum() * hist[1].sum()))
    assert abs(auc - exact) <= bound + 1e-12 and 0 < len(pos) < len(neg)


def test_a_few_steps_reduce_both_losses(tokenizer):
    obj, model = build(tokenizer)
    batch = obj.collate(random_examples(8, length=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(25):
        out = obj(model, batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        history.append((out["gen_loss"].item(), out["disc_loss"].item()))
    assert history[-1][0] < history[0][0] - 0.3, history
    assert history[-1][1] < history[0][1] - 0.1, history


# ---------------------------------------------------------------------------------------------------- export / configs


def test_export_round_trip_in_a_fresh_process(tokenizer, tmp_path):
    obj, model = build(tokenizer)
    with torch.no_grad():  # make the shared embeddings differ from any fresh init
        model.discriminator.electra.embeddings.word_embeddings.weight.add_(0.05)
    obj.export(model, tmp_path, tokenizer)
    targets = obj.export_targets(model, tmp_path)  # what the trainer checks after training
    assert [(path, auto) for path, auto, _ in targets] == [
        (tmp_path / "discriminator", "AutoModelForPreTraining"), (tmp_path / "generator", "AutoModelForMaskedLM")]
    assert targets[0][2] is model.discriminator and targets[1][2] is model.generator
    batch = obj.collate(random_examples(2, length=20))
    ids, mask = batch["original_ids"], batch["attention_mask"]
    disc = roundtrip_check(tmp_path / "discriminator", "AutoModelForPreTraining", model.discriminator, ids, mask)
    gen = roundtrip_check(tmp_path / "generator", "AutoModelForMaskedLM", model.generator, batch["input_ids"], mask)
    assert disc["class"] == "ElectraForPreTraining" and gen["class"] == "ElectraForMaskedLM"
    assert disc["vocab"] == gen["vocab"] == len(tokenizer)
    for sub in ("discriminator", "generator"):
        files = {p.name for p in (tmp_path / sub).iterdir()}
        assert "model.safetensors" in files and "tokenizer.json" in files and "pytorch_model.bin" not in files
    assert model.training  # roundtrip_check restores the mode


@pytest.mark.parametrize("name", ["electra-tiny", "electra-small", "electra-base"])
def test_configs_parse(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.objective.name == "electra"
    ElectraConfig(**cfg.objective.options())
    hidden, heads, _ = generator_shape(cfg.model.hidden_size, cfg.objective.electra.generator_size)
    assert hidden % heads == 0 and cfg.data.block_size <= cfg.model.max_position_embeddings
