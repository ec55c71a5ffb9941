"""SpanBERT: span-length law (mean ±4σ, chi-square), exact budget, whole disjoint word spans, one replacement
decision per span, SBO batch fields and head, gradients, export round trip, a short training run, configs."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import make_tokenizer, packed_examples, tiny_model_config
from objectives import IGNORE_INDEX, get_objective
from objectives.base import sample_generator
from objectives.span import SBO_HEAD_FILE, SpanObjective, load_sbo_head

ROOT = Path(__file__).parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def usable_vocab(tok):
    """Non-special tokens by id, in id order. The toy WordPiece vocab has a hole (an id is unused) and its last id
    equals len(tok), which the objective's tables (sized len(tok)) do not cover: keep ids < len(tok)."""
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    return {t: i for t, i in vocab if i < len(tok) and i not in tok.all_special_ids}


def synthetic_blocks(tok, n, length=512, seed=0):
    """``n`` packed blocks ``[CLS] … [SEP]`` of WordPiece-like words (1 piece 60%, 2: 25%, 3-6: 15%), documents
    separated by [SEP] (after 1 in 60 words), block-local word ids; built from the vocabulary directly (fast)."""
    rng = np.random.default_rng(seed)
    usable = usable_vocab(tok)
    heads = np.array([i for t, i in usable.items() if not t.startswith("##")])
    pieces = np.array([i for t, i in usable.items() if t.startswith("##")])
    blocks = []
    for index in range(n):
        sizes = rng.choice(6, size=length, p=[0.6, 0.25, 0.06, 0.04, 0.03, 0.02]) + 1
        head = rng.choice(heads, size=length)
        tail = rng.choice(pieces, size=(length, 5))
        sep = rng.random(length) < 1 / 60
        ids, words, word = [tok.cls_token_id], [-1], 0
        while len(ids) < length - 1:
            ids += [int(head[word])] + tail[word, :sizes[word] - 1].tolist()
            words += [word] * int(sizes[word])
            if sep[word]:
                ids.append(tok.sep_token_id)
                words.append(-1)
            word += 1
        blocks.append({"input_ids": ids[:length - 1] + [tok.sep_token_id], "word_ids": words[:length - 1] + [-1],
                       "index": index})
    return blocks


@pytest.fixture(scope="module")
def long_examples(tok):
    """512-token blocks (the paper's setting) of synthetic WordPiece words: fast to build in large numbers."""
    return synthetic_blocks(tok, 800)


@pytest.fixture(scope="module")
def real_examples(tok):
    """512-token blocks of text encoded by the tokenizer (its own word_ids), documents separated by [SEP]."""
    return [dict(e, index=i) for i, e in enumerate(packed_examples(tok, 40, length=512))]


@pytest.fixture(scope="module")
def short_examples(tok):
    """Blocks of 8..64 tokens: many spans touch [CLS]/[SEP]; different lengths exercise padding."""
    out = []
    for length in (8, 9, 12, 16, 24, 33, 64):
        out += packed_examples(tok, 60, length=length, seed=length)
    return [dict(e, index=i) for i, e in enumerate(out)]


def truncated_geometric(p=0.2, max_len=10):
    """P(ℓ), ℓ = 1..max_len, computed here independently of the objective."""
    w = np.array([(1 - p) ** (k - 1) for k in range(1, max_len + 1)])
    return w / w.sum()


def chi2_sf(x, df):
    """Survival function of the chi-square law: the regularised upper incomplete gamma Q(df/2, x/2)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2.0)))


def draws(obj, examples):
    """Re-run the placement exactly as collate does (same per-sample generator, drawn first)."""
    out = []
    for e in examples:
        ids = np.asarray(e["input_ids"])
        cand = ~obj.special_token_mask.numpy()[ids]
        words = np.asarray(e["word_ids"])
        out.append(obj.draw_spans(cand, obj.word_starts(ids, cand, words), sample_generator(obj.seed, e["index"])))
    return out


def masked_runs(selected):
    """Maximal runs [s, e] (inclusive) of True in a 1-D bool tensor."""
    s = selected.numpy().astype(np.int8)
    d = np.diff(np.concatenate([[0], s, [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1) - 1))


def n_special_free(ex, tok):
    return sum(1 for t in ex["input_ids"] if t not in tok.all_special_ids)


# --------------------------------------------------------------------------- span-length law


def test_span_length_mean_and_histogram(tok, long_examples):
    """Sampled span lengths follow the truncated geometric: mean 3.8 ± 4σ and a chi-square test.

    Which spans to count: all of them, each with its *sampled* length ℓ (the last span's ℓ before the cut at the
    budget). Spans are drawn one after another with ℓ_k independent of the earlier draws, and the decision to
    draw span k is taken before ℓ_k is drawn, so the number of spans N is a stopping time. Wald's identities then give
    E[Σ_{k≤N} f(ℓ_k)] = E[N]·E[f(ℓ)] and Var[Σ_{k≤N} (f(ℓ_k) − E f)] = E[N]·Var f(ℓ): pooled over blocks, the mean and
    the histogram behave like an i.i.d. sample of size ΣN (mean ± σ/√ΣN; multinomial covariance for the
    chi-square). Dropping the spans cut by the budget would *not* be unbiased: the span that crosses the budget is
    size-biased (long spans are more likely to cross it), so the remaining ones are too short (measured: 3.66, about
    5σ below 3.80 with these blocks). Independence of ℓ_k needs a free run of 10 words at every draw, which the
    512-token blocks always leave (asserted via ``conditioned``)."""
    obj = get_objective("span", tok)
    results = draws(obj, long_examples)
    assert sum(r.conditioned for r in results) == 0
    lengths = np.concatenate([r.lengths for r in results])
    probs = truncated_geometric()
    k = np.arange(1, 11)
    mean, var = float((probs * k).sum()), float((probs * k * k).sum() - (probs * k).sum() ** 2)
    assert abs(mean - 3.8) < 0.01  # the paper's 3.8
    sigma = math.sqrt(var / len(lengths))
    # the test can fail: min(ℓ, 10) clipping (mean 4.46) lies far outside the band
    assert abs((1 - 0.8 ** 10) / 0.2 - mean) > 20 * sigma
    assert abs(lengths.mean() - mean) <= 4 * sigma, f"mean {lengths.mean():.4f} vs {mean:.4f} ± {4 * sigma:.4f}"
    observed = np.bincount(lengths, minlength=11)[1:]
    expected = probs * len(lengths)
    assert expected.min() > 50
    stat = float(((observed - expected) ** 2 / expected).sum())
    p_value = chi2_sf(stat, df=len(probs) - 1)
    assert p_value > 1e-4, f"chi2 = {stat:.1f}, p = {p_value:.2g}; observed {observed}, expected {expected.round()}"
    # sanity of the chi-square itself: the clipped law is rejected with this many spans
    clipped = np.append(np.array([0.2 * 0.8 ** (j - 1) for j in range(1, 10)]), 0.8 ** 9) * len(lengths)
    assert chi2_sf(float(((observed - clipped) ** 2 / clipped).sum()), df=9) < 1e-10


def test_length_law_follows_the_options(tok, long_examples):
    obj = get_objective("span", tok, geometric_p=0.5, max_span_words=3)
    lengths = np.concatenate([r.lengths for r in draws(obj, long_examples[:200])])
    probs = truncated_geometric(0.5, 3)
    observed = np.bincount(lengths, minlength=4)[1:]
    assert lengths.max() == 3
    stat = float(((observed - probs * len(lengths)) ** 2 / (probs * len(lengths))).sum())
    assert chi2_sf(stat, df=2) > 1e-4


# --------------------------------------------------------------------------- placement invariants


def test_budget_is_exact_and_specials_are_never_masked(tok, long_examples, real_examples, short_examples):
    obj = get_objective("span", tok)
    examples = long_examples[:100] + real_examples + short_examples + [{"input_ids": [tok.cls_token_id, tok.sep_token_id]}]
    batch = obj.collate(examples)
    for row, labels, ex in zip(batch["input_ids"], batch["labels"], examples):
        ids = torch.tensor(ex["input_ids"])
        length = len(ids)
        selected = labels[:length] != IGNORE_INDEX
        n = n_special_free(ex, tok)
        assert int(selected.sum()) == -(-15 * n // 100), "budget must be exactly ceil(0.15 n)"
        assert not obj.special_token_mask[ids[selected]].any(), "a special token was masked"
        assert torch.equal(labels[:length][selected], ids[selected])
        assert torch.equal(row[:length][~selected], ids[~selected]), "unmasked tokens must be untouched"
        assert (labels[length:] == IGNORE_INDEX).all()


def test_spans_are_whole_words_disjoint_and_separated(tok, long_examples, real_examples, short_examples):
    obj = get_objective("span", tok)
    for examples, separated in ((long_examples[:150], True), (real_examples, True), (short_examples, False)):
        batch = obj.collate(examples)
        for labels, ex, draw in zip(batch["labels"], examples, draws(obj, examples)):
            words = np.asarray(ex["word_ids"])
            special = obj.special_token_mask.numpy()[np.asarray(ex["input_ids"])]
            selected = labels[:len(words)] != IGNORE_INDEX
            assert np.array_equal(selected.numpy(), draw.masked), "collate must mask what draw_spans placed"
            spans = sorted(draw.spans)
            for (b0, e0), (b1, _) in zip(spans, spans[1:]):
                assert e0 <= b1, "spans overlap"
                if separated:
                    assert e0 < b1, "spans touch (only allowed when a tiny block leaves no free word)"
            for i, ((begin, end), ell) in enumerate(zip(draw.spans, draw.lengths)):
                assert not special[begin:end].any()
                assert begin == 0 or words[begin - 1] != words[begin] or special[begin - 1], "starts inside a word"
                n_words = len(np.unique(words[begin:end]))
                if i < len(draw.spans) - 1:  # every span but the last covers exactly its ℓ whole words
                    assert n_words == ell
                    assert end == len(words) or words[end] != words[end - 1] or special[end], "ends inside a word"
                else:  # the last one may be cut at the budget: a prefix of its ℓ words
                    assert n_words <= ell
        if separated:  # each maximal masked run is one drawn span
            assert sum(len(masked_runs(l != IGNORE_INDEX)) for l in batch["labels"]) == sum(
                len(d.spans) for d in draws(obj, examples))


def test_tiny_blocks_fall_back_to_touching_spans_and_stay_exact(tok):
    """One segment of a 12-piece word between single-piece words: after the first spans only gap words are left."""
    vocab = usable_vocab(tok)
    heads = [i for t, i in vocab.items() if not t.startswith("##")][:4]
    pieces = [i for t, i in vocab.items() if t.startswith("##")][:11]
    obj = get_objective("span", tok)
    touched = 0
    for index in range(200):
        ids = [tok.cls_token_id, heads[0], heads[1]] + [heads[2]] + pieces + [heads[3], tok.sep_token_id]
        words = [-1, 0, 1] + [2] * 12 + [3, -1]
        batch = obj.collate([{"input_ids": ids, "word_ids": words, "index": index}])
        selected = batch["labels"][0] != IGNORE_INDEX
        assert int(selected.sum()) == math.ceil(0.15 * 15)  # 3 tokens
        draw = draws(obj, [{"input_ids": ids, "word_ids": words, "index": index}])[0]
        touched += len(masked_runs(selected)) < len(draw.spans)
    assert touched > 0, "the fallback was never exercised"


def test_word_boundaries_from_continuation_prefix(tok, real_examples, short_examples):
    """Without word_ids, words come from the ## prefix: the masks equal those computed with the tokenizer's ids."""
    obj = get_objective("span", tok)
    assert obj.is_continuation.sum() == sum(1 for t in tok.get_vocab() if t.startswith("##"))
    examples = real_examples + short_examples
    with_ids = obj.collate(examples)
    without = obj.collate([{"input_ids": e["input_ids"], "index": e["index"]} for e in examples])
    assert with_ids.keys() == without.keys() and with_ids["padded"] == without["padded"]
    for key in with_ids.keys() - {"padded"}:
        assert torch.equal(with_ids[key], without[key]), key


def test_masking_is_seeded_by_sample_index(tok, real_examples):
    obj = get_objective("span", tok, seed=3)
    a = obj.collate(real_examples[:8])
    b = obj.collate(real_examples[4:8])
    for key in b.keys() - {"padded"}:
        assert torch.equal(a[key][4:], b[key]), key
    c = get_objective("span", tok, seed=4).collate(real_examples[:8])
    assert not torch.equal(a["labels"], c["labels"])


# --------------------------------------------------------------------------- replacement


def test_one_replacement_decision_per_span(tok, long_examples):
    """Each span is all [MASK], all random or unchanged; the span-level split is 80/10/10 within ±4σ."""
    obj = get_objective("span", tok, unigram_random=False)
    batch = obj.collate(long_examples)
    v = len(obj.random_token_ids)  # a random token equals the original with probability 1/v
    kinds = {"mask": 0, "random": 0, "keep": 0}
    expected = {"mask": 0.0, "random": 0.0, "keep": 0.0}
    variance = dict(expected)
    for row, labels, ex in zip(batch["input_ids"], batch["labels"], long_examples):
        original = torch.tensor(ex["input_ids"])
        for s, e in masked_runs(labels != IGNORE_INDEX):
            got, orig = row[s:e + 1], original[s:e + 1]
            is_mask = got == tok.mask_token_id
            assert is_mask.all() or not is_mask.any(), "a span mixes [MASK] with other tokens"
            assert not obj.special_token_mask[got[~is_mask]].any(), "random tokens must be non-special"
            kind = "mask" if is_mask.all() else ("keep" if torch.equal(got, orig) else "random")
            kinds[kind] += 1
            same = (1 / v) ** (e - s + 1)  # a random span that happens to equal the original reads as "keep"
            probs = {"mask": 0.8, "random": 0.1 * (1 - same), "keep": 0.1 + 0.1 * same}
            for key, p in probs.items():
                expected[key] += p
                variance[key] += p * (1 - p)
    assert sum(kinds.values()) > 8000
    for key in kinds:
        assert abs(kinds[key] - expected[key]) <= 4 * math.sqrt(variance[key]), (key, kinds, expected)


def test_random_tokens_follow_the_unigram_counts(tok, long_examples):
    obj = get_objective("span", tok, mask_token_prob=0.0, random_token_prob=1.0)
    counts = np.zeros(len(tok))
    targets = [i for t, i in usable_vocab(tok).items() if t.isalpha()][:3]
    counts[targets] = [1, 2, 7]
    counts[tok.cls_token_id] = 1000  # special tokens' mass is ignored
    obj.set_unigram_counts(counts)
    batch = obj.collate(long_examples[:100])
    got = batch["input_ids"][batch["labels"] != IGNORE_INDEX]
    assert set(got.tolist()) <= set(targets)
    n = len(got)
    for t, p in zip(targets, (0.1, 0.2, 0.7)):
        assert abs(int((got == t).sum()) - n * p) <= 4 * math.sqrt(n * p * (1 - p))
    # unigram_random=False ignores the counts (uniform over the non-special vocabulary)
    uniform = get_objective("span", tok, mask_token_prob=0.0, random_token_prob=1.0, unigram_random=False)
    uniform.set_unigram_counts(counts)
    batch = uniform.collate(long_examples[:20])
    assert len(set(batch["input_ids"][batch["labels"] != IGNORE_INDEX].tolist())) > 50


# --------------------------------------------------------------------------- SBO batch fields and head


@pytest.mark.parametrize("max_positions", [15, 3])
def test_sbo_fields_point_at_the_span_boundaries(tok, short_examples, long_examples, max_positions):
    """For every masked token of a span (s, e): left = s-1, right = e+1, pos = i-s, or -1 everywhere when a boundary
    is not a real token of the block ([CLS], [SEP], padding) or pos >= sbo_max_positions."""
    obj = get_objective("span", tok, sbo_max_positions=max_positions)
    examples = short_examples + long_examples[:40]
    batch = obj.collate(examples)
    no_sbo = with_sbo = 0
    for b, ex in enumerate(examples):
        ids = torch.tensor(ex["input_ids"])
        special = obj.special_token_mask[ids]
        expect = {key: torch.full_like(batch["labels"][b], -1) for key in ("sbo_left", "sbo_right", "sbo_pos")}
        for s, e in masked_runs(batch["labels"][b] != IGNORE_INDEX):
            if s - 1 < 0 or e + 1 >= len(ids) or special[s - 1] or special[e + 1]:
                no_sbo += 1
                continue
            with_sbo += 1
            for i in range(s, min(e + 1, s + max_positions)):
                expect["sbo_left"][i], expect["sbo_right"][i], expect["sbo_pos"][i] = s - 1, e + 1, i - s
        for key, value in expect.items():
            assert torch.equal(batch[key][b], value), (key, b)
    assert no_sbo > 20 and with_sbo > 200, "both cases must be exercised"
    counts = obj.counts(batch)
    assert counts["n_sbo"] == (batch["sbo_pos"] >= 0).sum()
    assert counts["n_masked"] == (batch["labels"] != IGNORE_INDEX).sum()


def test_sbo_head_input_is_exactly_the_boundary_states(tok):
    """Hand-built batch with known hidden states: the head's first layer sees [h_{s-1}; h_{e+1}; p_{i-s}]."""
    obj = get_objective("span", tok)
    model = obj.build_model(tiny_model_config()).eval()
    ids = torch.tensor([[2, 10, 4, 4, 11, 12, 13, 3], [2, 14, 15, 16, 17, 4, 18, 3]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 2:4] = torch.tensor([20, 21])
    labels[1, 5] = 22
    none = torch.full_like(ids, -1)
    left, right, pos = none.clone(), none.clone(), none.clone()
    left[0, 2:4], right[0, 2:4], pos[0, 2:4] = 1, 4, torch.tensor([0, 1])
    left[1, 5], right[1, 5], pos[1, 5] = 4, 6, 0
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "sbo_left": left, "sbo_right": right, "sbo_pos": pos}
    hidden = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def known_hidden(module, args, output):
        output.last_hidden_state = hidden
        return output

    seen = []
    model.bert.register_forward_hook(known_hidden)
    obj.sbo_head.dense1.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    obj(model, batch)
    p = obj.sbo_head.position_embeddings.weight.detach()
    expected = torch.stack([
        torch.cat([hidden[0, 1], hidden[0, 4], p[0]]),
        torch.cat([hidden[0, 1], hidden[0, 4], p[1]]),
        torch.cat([hidden[1, 4], hidden[1, 6], p[0]]),
    ])
    assert len(seen) == 1 and torch.equal(seen[0], expected)


def reference_sbo_logits(head, left, right, pos, embedding):
    """The paper's SBO written out from the head's parameters: two Linear → GeLU → LayerNorm, tied decoder + bias."""
    x = torch.cat([left, right, head.position_embeddings.weight[pos]], -1)
    x = F.layer_norm(F.gelu(x @ head.dense1.weight.T + head.dense1.bias), (head.dense1.out_features,),
                     head.norm1.weight, head.norm1.bias, head.norm1.eps)
    x = F.layer_norm(F.gelu(x @ head.dense2.weight.T + head.dense2.bias), (head.dense2.out_features,),
                     head.norm2.weight, head.norm2.bias, head.norm2.eps)
    return x @ embedding.T + head.bias


def test_losses_equal_dense_references_and_are_token_exact(tok, short_examples):
    torch.manual_seed(0)
    obj = get_objective("span", tok, sbo_weight=0.5)
    model = obj.build_model(tiny_model_config()).eval()
    with torch.no_grad():
        obj.sbo_head.bias.normal_()  # a non-zero bias, so the test sees whether it is applied
    examples = [e for e in short_examples if len(e["input_ids"]) >= 24][:12]
    batch = obj.collate(examples)
    out = obj(model, batch)
    dense = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.allclose(out["mlm_loss"], dense.loss, atol=1e-5)
    # SBO, token by token, from the full hidden states
    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    losses = []
    emb = model.get_input_embeddings().weight
    for b, i in (batch["sbo_pos"] >= 0).nonzero().tolist():
        l, r, p = batch["sbo_left"][b, i], batch["sbo_right"][b, i], batch["sbo_pos"][b, i]
        logits = reference_sbo_logits(obj.sbo_head, hidden[b, l][None], hidden[b, r][None], p[None], emb)
        losses.append(F.cross_entropy(logits, batch["labels"][b, i][None]))
    assert len(losses) == int(out["n_sbo"]) > 10
    assert torch.allclose(out["sbo_loss"], torch.stack(losses).mean(), atol=1e-5)
    assert torch.allclose(out["loss"], out["mlm_loss"] + 0.5 * out["sbo_loss"], atol=1e-6)
    assert set(obj.metric_counts) == {"mlm_loss", "mlm_acc", "sbo_loss", "sbo_acc"}
    # normalising by the counts of the whole window gives the loss of the whole batch
    halves = [obj.collate(examples[:5]), obj.collate(examples[5:])]
    norm = {key: sum(obj.counts(h)[key] for h in halves) for key in ("n_masked", "n_sbo")}
    assert norm == {key: value for key, value in obj.counts(batch).items()}
    total = sum(obj(model, h, norm)["loss"] for h in halves)
    assert torch.allclose(total, out["loss"], atol=1e-5)


def test_sbo_gradient_reaches_the_encoder(tok, long_examples):
    obj = get_objective("span", tok)
    model = obj.build_model(tiny_model_config(max_position_embeddings=512))
    obj.loss_parts = {"sbo_loss": ("n_sbo", 1.0)}  # backpropagate the SBO term alone
    out = obj(model, obj.collate(long_examples[:2]))
    out["loss"].backward()
    for name, param in model.bert.named_parameters():
        if "pooler" in name:
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no SBO gradient on {name}"
    assert all(p.grad is None for p in model.cls.predictions.transform.parameters()), "the MLM head got gradient"
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0  # tied vocabulary projection
    for name, param in obj.sbo_head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- export, training, configs


def test_export_round_trip(tok, short_examples, tmp_path):
    from transformers import AutoModelForMaskedLM

    from pretrain.hf_io import roundtrip_check

    torch.manual_seed(0)
    obj = get_objective("span", tok)
    model = obj.build_model(tiny_model_config()).eval()
    with torch.no_grad():
        obj.sbo_head.bias.normal_()
    out_dir = tmp_path / "export"
    obj.export(model, out_dir, tok)
    obj.export(model, out_dir, tok)  # replacing an existing export
    assert (out_dir / SBO_HEAD_FILE).is_file() and (out_dir / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "staging directories left behind"
    batch = obj.collate([e for e in short_examples if len(e["input_ids"]) == 64][:4])
    result = roundtrip_check(out_dir, "AutoModelForMaskedLM", model, batch["input_ids"], batch["attention_mask"])
    assert result["class"] == "BertForMaskedLM"
    loaded = AutoModelForMaskedLM.from_pretrained(out_dir).eval()
    head = load_sbo_head(out_dir)
    with torch.no_grad():
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref = obj.sbo_head(*obj.sbo_inputs(hidden, batch)[:3], model.get_input_embeddings().weight)
        hidden2 = loaded.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        got = head(*obj.sbo_inputs(hidden2, batch)[:3], loaded.get_input_embeddings().weight)
        span = head.predict_span(hidden2[0], 3, 5, loaded.get_input_embeddings().weight)
        span_ref = obj.sbo_head.predict_span(hidden[0], 3, 5, model.get_input_embeddings().weight)
    assert got.shape[0] > 0 and torch.allclose(got, ref, atol=1e-6)
    assert span.shape == (3, len(tok)) and torch.allclose(span, span_ref, atol=1e-6)


def test_a_few_steps_reduce_both_losses(tok, short_examples):
    torch.manual_seed(0)
    obj = get_objective("span", tok)
    model = obj.build_model(tiny_model_config()).train()
    batch = obj.collate([e for e in short_examples if len(e["input_ids"]) == 64][:8])
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(obj.parameters()), lr=1e-3)
    first = None
    for _ in range(20):
        out = obj(model, batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        first = first or {k: float(out[k]) for k in ("mlm_loss", "sbo_loss")}
    last = obj(model, batch)
    assert float(last["mlm_loss"]) < first["mlm_loss"] - 0.5, (first, float(last["mlm_loss"]))
    assert float(last["sbo_loss"]) < first["sbo_loss"] - 0.5, (first, float(last["sbo_loss"]))


@pytest.mark.parametrize("name", ["spanbert-tiny.yaml", "spanbert-base.yaml"])
def test_configs_build_the_span_objective(tok, name):
    from pretrain.config import load_config

    cfg = load_config(ROOT / "configs" / name)
    assert cfg.objective.name == "span"
    obj = get_objective(cfg.objective.name, tok, seed=cfg.train.seed, **cfg.objective.options())
    assert isinstance(obj, SpanObjective) and obj.loss_parts["sbo_loss"] == ("n_sbo", cfg.objective.span.sbo_weight)
    if name == "spanbert-base.yaml":
        m, t = cfg.model, cfg.train
        assert (m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size) == (768, 12, 12, 3072)
        assert cfg.data.block_size == 512 == m.max_position_embeddings
        assert t.micro_batch_size * t.grad_accum == 256 and t.lr == 1e-4 and t.warmup_steps == 10000
        assert t.max_steps == 2_400_000 and t.schedule == "linear" and t.precision == "bf16"
        assert cfg.objective.span.sbo_position_dim == 200


def test_bad_options_are_rejected(tok):
    with pytest.raises(ValueError, match="did you mean 'sbo_weight'"):
        get_objective("span", tok, sbo_wieght=1.0)
    with pytest.raises(ValueError, match="geometric_p"):
        get_objective("span", tok, geometric_p=0.0)
    with pytest.raises(ValueError, match="max_span_words"):
        get_objective("span", tok, max_span_words=0)
    with pytest.raises(RuntimeError, match="build_model"):
        get_objective("span", tok)(None, {})
