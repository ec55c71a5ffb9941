"""The ``data`` suite (issue 19 item 5): preparing a corpus our way (``prepare_blocks``, ``data.num_proc`` 1 and N)
against the way the ``transformers`` MLM examples do it (``datasets.load_dataset("text")``, ``map(tokenize,
batched=True, num_proc)``, ``map(group_texts, batched=True, num_proc)``; num_proc 1 and N), with the same trained
tokenizer and block size, at several corpus sizes.

Corpora: the documents of ``--config``'s corpus (default: configs/tiny.yaml, the demo corpus), whitespace collapsed so
each is one line, repeated in order into ``{work}/corpus-{size}MB.txt`` up to the size (whole documents). Both ways
read that file (ours as ``data.files``), so they see the same documents. The tokenizer is the config's (trained on its
corpus once and cached), saved to ``{work}/tokenizer`` and loaded from there by every arm.

Every run is a fresh process (``python -m pretrain.bench.data``: ``arm_main``) on an empty cache directory, then a
second fresh process on the cache it left (the cached call), then a third on an empty cache again (the memory
sample). For each size, ``--repeat`` rounds of HF 1, ours 1, HF N,
ours N (A/B/A/B: the two ways share the machine's noise). Per run:

* ``seconds``: the preparation call, timed inside the process (loading the tokenizer, the text into Arrow,
  tokenizing, packing; not the interpreter's start and imports); ``tok_per_s`` = corpus tokens / seconds, where
  corpus tokens are the documents' tokens without special tokens: the same number for every arm (recorded per run);
* ``peak_pss_anon_mb``: the largest sum, over the process tree (the arm and its workers), of ``Pss_Anon`` from
  ``/proc/<pid>/smaps_rollup``, sampled every ``SAMPLE_S``: anonymous memory, pages that forked workers share counted
  once, page cache (the memory-mapped Arrow and .npy files) excluded. Sampling takes CPU from the arm, so it runs in a
  third call of the arm on an empty cache, which is not timed;
* ``disk_bytes_per_token``: the bytes of every file the first call left in its cache directory, per corpus token
  (ours: the Arrow copy of the text that ``datasets`` makes, and the blocks with their word ids; HF: the Arrow text,
  the tokenized and the grouped datasets);
* ``cached_s``: the second call's preparation time, and ``cache_hit``: it read what the first call wrote.

Summary rows: medians per size and arm; ours also gets ``ratio_vs_hf`` (its medians over HF's at the same num_proc).
The two ways' blocks differ by construction, so their block counts differ a little: ours are ``[CLS]`` + L−2 tokens
of the stream ``doc [SEP] doc [SEP] ...`` + ``[SEP]`` with block-local word ids, the remainder carried to the end
(one partial block dropped); theirs are L tokens of the concatenated ``[CLS] doc [SEP]`` sequences with
``token_type_ids``, ``attention_mask`` and ``special_tokens_mask`` columns, the remainder of every 1000-document map
batch dropped. ``TOKENIZERS_PARALLELISM`` is passed through as set (recorded): unset, the HF way's tokenizer calls
may use more threads than its processes; ours tokenizes on one thread per process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import default_out, environment

ROOT = Path(__file__).resolve().parents[2]
#: seconds between two memory samples of a running arm
SAMPLE_S = 0.1
#: (way, num_proc) of one round, num_proc None = ``--num-proc``
ROUND = (("hf", 1), ("ours", 1), ("hf", None), ("ours", None))
#: the per-run values of which the summary takes medians (and ours the ratios to HF's)
MEDIANS = ("seconds", "tok_per_s", "peak_pss_anon_mb", "disk_bytes_per_token", "cached_s")


# --------------------------------------------------------------------------- one arm (in its own process)


def prepare_ours(corpus: Path, tokenizer: Path, block_size: int, num_proc: int, cache: Path) -> dict:
    from pretrain.config import Config, DataConfig, TokenizerConfig, TrainConfig
    from pretrain.data import prepare_blocks

    cfg = Config(data=DataConfig(files=[str(corpus)], cache_dir=str(cache), block_size=block_size,
                                 validation_fraction=0.0, num_proc=num_proc),
                 tokenizer=TokenizerConfig(path=str(tokenizer)), train=TrainConfig(seed=0))
    start = time.perf_counter()
    data = prepare_blocks(cfg)
    seconds = time.perf_counter() - start
    train = data.meta["splits"]["train"]  # validation_fraction 0: every block; the stream has one [SEP] per document
    return {"seconds": seconds, "documents": train["documents"],
            "corpus_tokens": train["stream_tokens"] - train["documents"], "blocks": train["blocks"],
            "block_tokens": train["tokens"], "product": f"{data.cache_path.name} built in {data.meta['seconds']} s"}


def prepare_hf(corpus: Path, tokenizer: Path, block_size: int, num_proc: int, cache: Path) -> dict:
    import itertools

    import datasets
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    raw = datasets.load_dataset("text", data_files=[str(corpus)], split="train", cache_dir=str(cache))

    def tokenize(batch):
        return tok(batch["text"], return_special_tokens_mask=True)

    def group_texts(batch):
        joined = {k: list(itertools.chain.from_iterable(v)) for k, v in batch.items()}
        total = len(joined["input_ids"]) // block_size * block_size
        return {k: [v[i:i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}

    procs = num_proc if num_proc > 1 else None
    tokenized = raw.map(tokenize, batched=True, num_proc=procs, remove_columns=["text"])
    blocks = tokenized.map(group_texts, batched=True, num_proc=procs)
    seconds = time.perf_counter() - start
    tokens = pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py()
    return {"seconds": seconds, "documents": len(raw), "corpus_tokens": tokens - 2 * len(tokenized),  # [CLS], [SEP]
            "blocks": len(blocks), "block_tokens": len(blocks) * block_size,
            "product": sorted(Path(f["filename"]).name for f in blocks.cache_files)}


def arm_main(argv=None) -> None:
    """One preparation, ``python -m pretrain.bench.data --way ours|hf ...`` (a process that imports only what its
    way needs); its measurements go to ``--result`` as JSON."""
    parser = argparse.ArgumentParser(description="one arm of the data benchmark suite")
    parser.add_argument("--way", choices=["ours", "hf"], required=True)
    for name in ("corpus", "tokenizer", "cache", "result"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--block-size", type=int, required=True)
    parser.add_argument("--num-proc", type=int, required=True)
    args = parser.parse_args(argv)
    # both ways load the tokenizer with transformers' AutoTokenizer: imported before either clock starts (ours
    # imports it lazily, inside prepare_blocks)
    getattr(importlib.import_module("transformers"), "AutoTokenizer")
    prepare = {"ours": prepare_ours, "hf": prepare_hf}[args.way]
    result = prepare(args.corpus, args.tokenizer, args.block_size, args.num_proc, args.cache)
    args.result.write_text(json.dumps(result))


# --------------------------------------------------------------------------- measuring a process tree


def tree_pss_anon(root: int) -> int:
    """Bytes of ``Pss_Anon`` summed over process ``root`` and its descendants (0 for those already gone)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        match = re.search(r"^Pss_Anon:\s+(\d+) kB", rollup, re.M)
        if match is None:
            raise RuntimeError("/proc/<pid>/smaps_rollup has no Pss_Anon line (Linux >= 5.x needed)")
        total += int(match.group(1)) * 1024
    return total


def run_measured(cmd: list[str], result: Path, log: Path, sample: bool = True) -> tuple[dict, int]:
    """Run ``cmd`` (an arm writing ``result``), sampling its tree's memory when ``sample``; returns (its result, peak
    Pss_Anon, 0 unsampled)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    peak = 0
    result.unlink(missing_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while sample and proc.poll() is None:
            peak = max(peak, tree_pss_anon(proc.pid))
            time.sleep(SAMPLE_S)
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
    return json.loads(result.read_text()), peak


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------- the suite


def write_corpus(lines: list[str], path: Path, size_bytes: int) -> int:
    """``lines`` (one document each) repeated in order into ``path`` up to ``size_bytes`` (whole lines, at least
    one); returns the bytes written."""
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            for line in lines:
                f.write(line + "\n")
                written += len(line.encode()) + 1
                if written >= size_bytes:
                    break
    return written


def measure(args, way: str, num_proc: int, corpus: Path, tokenizer: Path, block_size: int) -> dict:
    """One run of an arm: the timed first call on an empty cache, the cached call, then a third, untimed call on an
    empty cache whose memory is sampled (reading every process's ``smaps_rollup`` ten times a second takes CPU
    from the arm: it slowed two processes on two cores by about a tenth); the cache is removed after."""
    cache = args.work / f"cache-{way}-{num_proc}"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    result, log = args.work / f"result-{way}-{num_proc}.json", args.work / f"log-{way}-{num_proc}.txt"
    cmd = [sys.executable, "-m", "pretrain.bench.data", "--way", way, "--corpus", str(corpus),
           "--tokenizer", str(tokenizer), "--block-size", str(block_size), "--num-proc", str(num_proc),
           "--cache", str(cache), "--result", str(result)]
    load = os.getloadavg()[0]
    first, _ = run_measured(cmd, result, log, sample=False)
    disk = directory_bytes(cache)
    cached, _ = run_measured(cmd, result, log, sample=False)
    shutil.rmtree(cache)
    cache.mkdir()
    _, peak = run_measured(cmd, result, log)
    shutil.rmtree(cache)
    tokens = first["corpus_tokens"]
    return {"way": way, "num_proc": num_proc, "arm": f"{way}-{num_proc}proc", "load_avg_1m": load,
            "seconds": first["seconds"], "tok_per_s": tokens / first["seconds"], "corpus_tokens": tokens,
            "documents": first["documents"], "blocks": first["blocks"], "block_tokens": first["block_tokens"],
            "peak_pss_anon_mb": peak / 2 ** 20, "disk_bytes": disk, "disk_bytes_per_token": disk / tokens,
            "cached_s": cached["seconds"], "cache_hit": cached["product"] == first["product"]}


def summarise(runs: list[dict]) -> list[dict]:
    """Medians per (size, arm); ours with its ratios to HF at the same num_proc."""
    rows = []
    for size in dict.fromkeys(r["size_mb"] for r in runs):
        medians = {}
        for arm in dict.fromkeys(r["arm"] for r in runs if r["size_mb"] == size):
            mine = [r for r in runs if r["size_mb"] == size and r["arm"] == arm]
            medians[arm] = {"size_mb": size, "corpus_tokens": mine[0]["corpus_tokens"], "arm": arm,
                            "way": mine[0]["way"], "num_proc": mine[0]["num_proc"], "runs": len(mine),
                            "cache_hit": all(r["cache_hit"] for r in mine),
                            **{k: statistics.median(r[k] for r in mine) for k in MEDIANS}}
        for row in medians.values():
            if row["way"] == "ours":
                hf = medians[f"hf-{row['num_proc']}proc"]
                row["ratio_vs_hf"] = {k: row[k] / hf[k] for k in MEDIANS}
        rows += medians.values()
    return rows


def table(summary: list[dict]) -> str:
    """The markdown table of the summary rows (× HF: ours over HF at the same num_proc)."""
    lines = ["| corpus | tokens | arm | prepare s | tok/s | × HF | peak Pss_Anon MB | × HF | disk B/token | × HF | "
             "cached call s | × HF |", "|---" * 12 + "|"]
    for r in summary:
        ratio = r.get("ratio_vs_hf")

        def x(key):
            return f"{ratio[key]:.2f}" if ratio else ""

        lines.append(f"| {r['size_mb']:g} MB | {r['corpus_tokens'] / 1e6:.2f}M | {r['arm']} | {r['seconds']:.1f} | "
                     f"{r['tok_per_s'] / 1e3:.0f}k | {x('tok_per_s')} | {r['peak_pss_anon_mb']:.0f} | "
                     f"{x('peak_pss_anon_mb')} | {r['disk_bytes_per_token']:.1f} | {x('disk_bytes_per_token')} | "
                     f"{r['cached_s']:.2f}{'' if r['cache_hit'] else ' (miss)'} | {x('cached_s')} |")
    return "\n".join(lines) + "\n"


def suite_data(args) -> dict:
    import datasets
    import tokenizers

    from pretrain.config import load_config
    from pretrain.data import get_tokenizer, load_corpus

    if args.num_proc < 2:
        raise ValueError(f"--num-proc {args.num_proc}: N must be >= 2 (the rounds also run 1 process)")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config)
    tokenizer = args.work / "tokenizer"
    get_tokenizer(cfg.tokenizer, cfg.data).save_pretrained(str(tokenizer))
    lines = [" ".join(text.split()) for text in load_corpus(cfg.data)["text"]]
    env = {**environment("cpu"), "datasets": datasets.__version__, "tokenizers": tokenizers.__version__,
           "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")}
    results = {"environment": env, "protocol": {
        "config": str(args.config), "block_size": cfg.data.block_size, "sizes_mb": args.sizes_mb,
        "num_proc": args.num_proc, "repeat": args.repeat, "round": [f"{w}-{n or args.num_proc}proc" for w, n in ROUND],
        "memory": f"peak over samples every {SAMPLE_S} s of the sum of Pss_Anon (/proc/<pid>/smaps_rollup) over the "
                  "arm's process tree: anonymous memory, shared pages counted once, page cache excluded; sampled "
                  "in a third, untimed call on an empty cache (the timed calls run unsampled)",
        "disk": "bytes of the files the first call left in its cache directory, per corpus token",
        "tokens": "corpus tokens: the documents' tokens without special tokens (the same for every arm)"},
        "runs": []}
    for size in args.sizes_mb:
        corpus = args.work / f"corpus-{size:g}MB.txt"
        corpus_bytes = write_corpus(lines, corpus, int(size * 2 ** 20))
        for repeat in range(args.repeat):
            for way, num_proc in ROUND:
                run = {"size_mb": size, "corpus_bytes": corpus_bytes, "round": repeat,
                       **measure(args, way, num_proc or args.num_proc, corpus, tokenizer, cfg.data.block_size)}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
        corpus.unlink()
    results["summary"] = summarise(results["runs"])
    out = args.out or default_out("data")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table(results["summary"]))
    return results


if __name__ == "__main__":
    arm_main()
