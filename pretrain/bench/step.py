"""The ``step`` suite (DESIGN.md §6): one optimizer step of the stock ``transformers`` recipe a user would write
(the ``--arch``'s own ``*ForMaskedLM(labels=...)``) against the trainer's own step
(``pretrain.steps.backprop.BackpropStep``) on the same model, in one or more variants that switch the fast path's
levers one by one. See ``pretrain.bench.cli`` for the protocol."""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import typing

from .common import PRESETS, RandomTokenizer, environment, random_blocks, seconds_per_step


def baseline_what(objective: str, stock) -> str:
    """The baseline row's description: the stock class of the arch (``stock``: the model it trains)."""
    if objective == "electra":
        return ("StockElectra: ElectraForMaskedLM(labels=...) full logits, torch.multinomial replacements, "
                "ElectraForPreTraining(labels=...), clip, AdamW")
    what = f"stock {type(stock).__name__}(labels=...) (full-vocabulary logits), clip, AdamW"
    if objective == "span":
        what += (" on the span-masked batch; no SBO head (transformers has none), so the ratio understates ours, "
                 "which also computes the SBO loss")
    return what


def step_config(args, objective: str, arch: str, device):
    from pretrain.config import config_from_dict

    hidden, layers, heads, intermediate, _, embedding = PRESETS[args.preset]
    return config_from_dict({
        "output_dir": "unused",
        "data": {"files": ["random-tokens"], "block_size": args.seq, "num_workers": 0},
        "model": {"arch": arch, "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
                  "intermediate_size": intermediate, "max_position_embeddings": max(512, args.seq),
                  "embedding_size": embedding, "hidden_dropout": 0.1, "attention_dropout": 0.1},
        # a static masked count per block, as BERT's reference data pipeline (and the fast path's static shapes)
        "objective": {"name": objective, "mlm": {"static_count": True}},
        "train": {"micro_batch_size": args.batch, "max_steps": 10 ** 6, "lr": 1e-4, "warmup_steps": 0,
                  "schedule": "constant", "device": device.type,
                  "precision": "bf16" if device.type == "cuda" else "fp32"},
        "log": {"tensorboard": False},
    })


class StockElectra:
    """The ELECTRA step a user writes with the stock classes: full [B, L, V] generator logits through
    ``ElectraForMaskedLM(labels=...)``, replacements drawn with ``torch.multinomial`` from the softmax at the
    masked positions (no gradient), ``ElectraForPreTraining(labels=replaced)``; loss = gen + 50 * disc."""

    def __init__(self, ours):
        self.generator, self.discriminator = ours.generator, ours.discriminator

    def parameters(self):
        return list({id(p): p for m in (self.generator, self.discriminator) for p in m.parameters()}.values())

    def loss(self, batch: dict):
        import torch

        gen_out = self.generator(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 labels=batch["labels"])
        selected = batch["labels"] != -100
        with torch.no_grad():
            probs = torch.softmax(gen_out.logits[selected].float(), -1)
            sampled = torch.multinomial(probs, 1).squeeze(1)
        disc_ids = batch["original_ids"].clone()
        disc_ids[selected] = sampled
        replaced = (disc_ids != batch["original_ids"]).long()
        disc_out = self.discriminator(input_ids=disc_ids, attention_mask=batch["attention_mask"], labels=replaced)
        return gen_out.loss + 50.0 * disc_out.loss, gen_out.loss


class Variant(typing.NamedTuple):
    """One of our arm's variants (``--ours``)."""

    fast: bool  #: ``apply_fast_path`` (static shapes) + ``compile_step``
    fuse: bool  #: FusedEncoder stacks
    keep_mask: bool  #: feed the encoders the all-ones mask of unpadded blocks
    what: str  #: the row's description


OUR_VARIANTS = {
    "eager": Variant(False, False, False, "the trainer's step (BackpropStep: objective's sparse heads, "
                                          "token-exact accumulation, clip, finite check, AdamW), model.fast off"),
    "fused": Variant(False, True, False, "the trainer's step with FusedEncoder stacks, eager"),
    # the DESIGN §6 profile's setting, and the same without the all-ones mask (SDPA may use flash)
    "compiled+mask": Variant(True, False, True, "static-shape heads, HF encoders fed the all-ones attention mask, "
                                                "step compiled"),
    "compiled": Variant(True, False, False, "static-shape heads, HF encoders without a mask on unpadded blocks, "
                                            "step compiled"),
    "fast": Variant(True, True, False, "model.fast: static-shape heads, FusedEncoder stacks without a mask on "
                                       "unpadded blocks, step compiled"),
}


def state_bytes(parameters, optimizer) -> int:
    """Bytes an arm holds between steps: its parameters and optimizer state (gradients are freed by
    ``zero_grad(set_to_none=True)``). Lets each arm's peak memory be reported without the other arms' state."""
    import torch

    tensors = list(parameters) + [v for st in optimizer.state.values() for v in st.values()
                                  if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def our_arm(cfg, model, objective, variant: Variant, device, evaluated, key: str) -> dict:
    """The trainer's own step (a fresh ``BackpropStep``) around ``model`` with ``variant``'s levers applied."""
    from pretrain.data.stream import to_device
    from pretrain.fast import apply_fast_path, fuse_encoders
    from pretrain.steps.backprop import BackpropStep

    if variant.fast:
        apply_fast_path(model, objective, cfg.data.block_size, fuse=variant.fuse)
    elif variant.fuse:
        fuse_encoders(objective.encoders(model))
    runner = BackpropStep(cfg)
    runner.prepare(model, objective, objective, compile=variant.fast)
    counter = iter(range(10 ** 9))

    def step(batch):
        runner.train_step([dict(batch, padded=True) if variant.keep_mask else batch], cfg.train.lr, next(counter))

    module = runner.module
    return {"step": step, "state": lambda: state_bytes(module.parameters(), runner.optimizer),
            "first_loss": lambda b: evaluated([module], lambda: module(to_device(b, device))[key])}


def step_arms(args, objective_name: str, arch: str, device):
    """The arms on the same initial weights: ``baseline`` (the stock step of ``arch``'s ``*ForMaskedLM``, or the
    stock ELECTRA pair) and one ``ours:<variant>`` per ``--ours`` variant (the trainer's step on the same model), each a
    dict with ``step`` (one optimizer step on a micro-batch), ``first_loss(batch)`` (the MLM/generator loss, eval
    mode; call it before any step) and ``state()`` (bytes of its parameters and optimizer state)."""
    import torch

    from objectives import get_objective
    from pretrain.data.stream import to_device

    cfg = step_config(args, objective_name, arch, device)
    vocab = PRESETS[args.preset][4]
    tok = RandomTokenizer(vocab)
    torch.manual_seed(0)
    objective = get_objective(objective_name, tok, seed=0, **cfg.objective.options())
    objective.set_unigram_counts(torch.ones(vocab))
    model = objective.build_model(cfg.model)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.train.precision == "bf16"
                else contextlib.nullcontext())
    key = {"mlm": "mlm_loss", "span": "mlm_loss", "electra": "gen_loss"}[objective_name]

    def evaluated(modules, loss):
        with torch.no_grad():
            for m in modules:
                m.eval()
            with autocast:
                value = float(loss())
            for m in modules:
                m.train()
        return value

    arms = {}
    for variant in args.ours:  # each on its own copy of the initial weights
        arms[f"ours:{variant}"] = our_arm(cfg, copy.deepcopy(model), copy.deepcopy(objective),
                                          OUR_VARIANTS[variant], device, evaluated, key)

    stock = model
    if objective_name == "electra":
        baseline_model = StockElectra(stock)
        for m in (stock.generator, stock.discriminator):
            m.to(device)
        parameters = baseline_model.parameters()
        baseline_loss = baseline_model.loss
    else:
        stock.to(device)
        parameters = list(stock.parameters())

        def baseline_loss(batch):
            out = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            return out.loss, out.loss

    if args.compile:
        baseline_loss = torch.compile(baseline_loss)
    baseline_opt = torch.optim.AdamW(parameters, lr=1e-4, eps=1e-6, weight_decay=0.01,
                                     fused=device.type == "cuda" or None)

    def baseline_step(batch):
        batch = to_device(batch, device)
        with autocast:
            loss, _ = baseline_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        baseline_opt.step()
        baseline_opt.zero_grad(set_to_none=True)

    stock_modules = [stock.generator, stock.discriminator] if objective_name == "electra" else [stock]
    baseline = {"step": baseline_step, "state": lambda: state_bytes(parameters, baseline_opt),
                "first_loss": lambda b: evaluated(stock_modules, lambda: baseline_loss(to_device(b, device))[1])}
    arms = {"baseline": baseline, **arms}
    n_params = sum(p.numel() for m in stock_modules for n, p in m.named_parameters() if "embeddings" not in n)
    return cfg, objective, arms, n_params, baseline_what(objective_name, stock)


def suite_step(args) -> list[dict]:
    import torch

    from pretrain.metrics import peak_flops, train_flops_per_token

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    args.ours = args.ours or (["fast"] if device.type == "cuda" else ["eager"])
    # every compiled arm adds graphs (train/eval, generator/discriminator) to the one code object HF's forward
    # wrapper shares between instances: past the default limit of 8, later arms would silently run eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    env = environment(args.device)
    rows = []
    for arch, objective_name in ((a, o) for a in args.arch for o in args.objective):
        cfg, objective, arms, n_params, stock_what = step_arms(args, objective_name, arch, device)
        batches = [objective.collate(b) for b in random_blocks(8, args.batch, args.seq, PRESETS[args.preset][4])]
        first_loss = {arm: a["first_loss"](batches[0]) for arm, a in arms.items()}
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        peaks: dict[str, float | None] = {arm: None for arm in arms}
        for arm in arms.values():  # warm-up (and compilation) off the clock
            for s in range(args.warmup):
                arm["step"](batches[s % len(batches)])
        for _ in range(args.repeat):
            for name, arm in arms.items():
                if device.type == "cuda":  # the arm's own peak: its state, plus what its steps allocate on top
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    held = torch.cuda.memory_allocated()
                times[name].append(seconds_per_step(arm["step"], batches, args.steps, device))
                if device.type == "cuda":
                    own = (torch.cuda.max_memory_allocated() - held + arm["state"]()) / 2 ** 20
                    peaks[name] = max(peaks[name] or 0.0, own)
        tokens = args.batch * args.seq
        flops = tokens * train_flops_per_token(n_params, cfg.model.num_layers, cfg.model.hidden_size, args.seq)
        peak = peak_flops(env["device"])
        step_s = {arm: statistics.median(ts) for arm, ts in times.items()}
        for name in arms:
            arm, _, variant = name.partition(":")
            row = {"suite": "step", "arm": arm, "variant": variant or None,
                   "what": stock_what if arm == "baseline" else OUR_VARIANTS[variant].what,
                   "arch": arch, "objective": objective_name, "preset": args.preset,
                   "seq": args.seq, "batch": args.batch, "precision": cfg.train.precision,
                   "compile_baseline": bool(args.compile), "tok_per_s": tokens / step_s[name],
                   "step_ms": 1000 * step_s[name], "step_ms_rounds": [1000 * t for t in times[name]],
                   "mfu": flops / step_s[name] / peak if peak else None, "peak_mem_mb": peaks[name],
                   "peak_mem_ratio": (peaks[name] / peaks["baseline"]) if peaks[name] else None,
                   "ratio": step_s["baseline"] / step_s[name], "first_mlm_loss": first_loss[name],
                   "first_loss_rel_diff": abs(first_loss[name] - first_loss["baseline"]) / abs(first_loss["baseline"]),
                   "threads": args.threads, **env}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows
