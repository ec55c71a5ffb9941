"""The offline demo corpus: real English prose fetched from Debian packages (DESIGN.md section 7).

``fetch_demo_corpus(cache_dir, parts)`` downloads a few Debian packages with ``apt-get download`` (no install, no
root needed when the package lists are present), extracts them with ``dpkg-deb -x`` into a temporary directory and
writes one JSONL file per part, ``{cache_dir}/demo-corpus/{part}.jsonl``, one ``{"text", "source"}`` document per
line. Parts already present are not fetched again. Nothing is committed to the repository.

Parts (package, licence):

* ``bible``   -- ``bible-kjv-text`` + ``bible-kjv`` (public domain): one document per chapter of the KJV.
* ``pydoc``   -- ``python3.11-doc`` (PSF licence): the reStructuredText sources reduced to prose, ~300 words each.
  Where the release has no python3.11-doc, the python3.X-doc that ``python3-doc`` depends on is used.
* ``gcide``   -- ``dict-gcide`` (GPL): one document per dictionary entry, markup stripped, capped at ~20 MB.
* ``wordnet`` -- ``wordnet-base`` (WordNet licence): one document per synset gloss. The same glosses with their
  lexicographer file (45 supersense classes) form a labelled downstream task, see :func:`wordnet_supersense`.
  Leave ``wordnet`` out of the pretraining corpus when that task is used for evaluation.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Callable, Iterable, Iterator

logger = logging.getLogger(__name__)

#: bump when the text extraction changes (part of the corpus fingerprint of demo parts)
DEMO_FORMAT_VERSION = 1

PACKAGES: dict[str, tuple[str, ...]] = {
    "bible": ("bible-kjv-text", "bible-kjv"),
    "pydoc": ("python3.11-doc",),  # see _release_pydoc_package for other releases
    "gcide": ("dict-gcide",),
    "wordnet": ("wordnet-base",),
}
DEMO_PARTS = tuple(PACKAGES)
PYDOC_PACKAGE = "python3.11-doc"

#: raw dictionary text kept from GCIDE (entries are sampled evenly over the alphabet up to this size)
GCIDE_MAX_BYTES = 20_000_000
#: target length of a pydoc document, in words (sections shorter than this are merged with the next)
PYDOC_WORDS_PER_DOCUMENT = 300

# lexnames(5WN): lexicographer file number -> name; the number is the 2nd field of a data.{noun,verb,adj,adv} line
WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
SUPERSENSE_FILE = "wordnet_supersense.jsonl"


class DemoCorpusError(ValueError):
    """The demo corpus could not be fetched; the message says why and what to do instead. (A ValueError like the
    other corpus problems, so command-line entry points report it as a configuration error.)"""


def demo_dir(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir).expanduser() / "demo-corpus"


def fetch_demo_corpus(
    cache_dir: str | os.PathLike, parts: Iterable[str] = ("bible", "pydoc", "gcide")
) -> dict[str, Path]:
    """Make sure each demo part exists as ``{cache_dir}/demo-corpus/{part}.jsonl``; returns part -> path."""
    parts = list(dict.fromkeys(parts))
    unknown = [p for p in parts if p not in PACKAGES]
    if unknown:
        raise ValueError(f"unknown demo parts {unknown}; choose from {', '.join(DEMO_PARTS)}")
    out_dir = demo_dir(cache_dir)
    paths = {part: out_dir / f"{part}.jsonl" for part in parts}
    missing = [p for p in parts if not _part_complete(out_dir, p)]
    if not missing:
        return paths

    _check_tools()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="demo-corpus-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        packages = [pkg for part in missing for pkg in PACKAGES[part]]
        debs = _apt_download(packages, tmp)
        logger.info("downloaded %s in %.1fs", ", ".join(packages), time.perf_counter() - start)
        for part in missing:
            start = time.perf_counter()
            root = tmp / f"root-{part}"
            for pkg in PACKAGES[part]:
                _run(["dpkg-deb", "-x", str(debs[pkg]), str(root)], f"extracting {debs[pkg].name}")
            n_docs = _write_jsonl(paths[part], BUILDERS[part](root))
            if part == "wordnet":
                _write_jsonl(out_dir / SUPERSENSE_FILE, _wordnet_examples(root))
            shutil.rmtree(root, ignore_errors=True)
            logger.info("demo corpus part %s: %d documents in %.1fs", part, n_docs, time.perf_counter() - start)
    return paths


def wordnet_supersense(cache_dir: str | os.PathLike) -> list[dict]:
    """WordNet gloss -> supersense examples: ``[{"text": gloss, "label": 0..44, "name": "noun.animal"}, ...]``.

    The label is the lexicographer file number of the synset (lexnames(5WN)); ~117k examples, 45 classes.
    """
    path = demo_dir(cache_dir) / SUPERSENSE_FILE
    if not path.exists():
        fetch_demo_corpus(cache_dir, ["wordnet"])
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- download / extraction helpers


def _part_complete(out_dir: Path, part: str) -> bool:
    files = [f"{part}.jsonl"] + ([SUPERSENSE_FILE] if part == "wordnet" else [])
    return all((out_dir / f).exists() for f in files)


def _check_tools() -> None:
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DemoCorpusError(
                f"the demo corpus is fetched from Debian packages but '{tool}' is not on PATH: install Debian's "
                "apt/dpkg (or run on Debian/Ubuntu), or pass your own corpus with data.files"
            )


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        raise DemoCorpusError(f"{what} failed ({' '.join(cmd)}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _apt_download(packages: list[str], dest: Path) -> dict[str, Path]:
    """``apt-get download`` the packages into ``dest``; refresh the package lists once if one is unknown."""

    def download():
        cmd = ["apt-get", "download", "-q", *packages]
        return subprocess.run(cmd, cwd=dest, capture_output=True, text=True, errors="replace")

    proc = download()
    if proc.returncode != 0 and "Unable to locate package" in proc.stderr:
        logger.info("apt-get cannot locate some of %s: running apt-get update once", packages)
        update = subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, errors="replace")
        if update.returncode != 0:
            raise DemoCorpusError(
                "apt-get does not know the demo corpus packages and 'apt-get update' failed (it needs root: run "
                f"'sudo apt-get update' once), or pass your own corpus with data.files: {update.stderr.strip()[-1000:]}"
            )
        proc = download()
        if proc.returncode != 0 and f"Unable to locate package {PYDOC_PACKAGE}" in proc.stderr:
            packages = [_release_pydoc_package() if p == PYDOC_PACKAGE else p for p in packages]
            proc = download()
    if proc.returncode != 0:
        raise DemoCorpusError(
            f"'apt-get download {' '.join(packages)}' failed (is a Debian mirror reachable?); pass your own corpus "
            f"with data.files instead: {proc.stderr.strip()[-2000:]}"
        )
    debs = {}
    for pkg in packages:
        found = sorted(dest.glob(f"{pkg}_*.deb"))
        if not found:
            raise DemoCorpusError(f"apt-get download reported success but no {pkg}_*.deb is in {dest}")
        debs[PYDOC_PACKAGE if pkg.endswith("-doc") else pkg] = found[0]
    return debs


def _release_pydoc_package() -> str:
    """The python3.X-doc package of this release (what the python3-doc metapackage depends on)."""
    proc = subprocess.run(["apt-cache", "depends", "python3-doc"], capture_output=True, text=True, errors="replace")
    for line in proc.stdout.splitlines():
        name = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and name.startswith("python3.") and name.endswith("-doc"):
            logger.info("%s is not in this release: using %s", PYDOC_PACKAGE, name)
            return name
    return PYDOC_PACKAGE


def _write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write records as JSON lines atomically (tmp file + os.replace); returns the count."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        if n == 0:
            raise DemoCorpusError(f"no documents extracted for {path.name}: the package layout may have changed")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------- bible


_VERSE = re.compile(r"^\s+(\d+) (.*)$")
_CHAPTER = re.compile(r"^(?:[1-3] )?[A-Z][a-z]+(?: of [A-Z][a-z]+)? (\d+)$")


def _bible_documents(root: Path) -> Iterator[dict]:
    """Decode the compressed KJV with the package's own reader, one document per chapter."""
    binary, data_dir = root / "usr/bin/bible", root / "usr/lib"
    if not (data_dir / "bible.data").exists() or not binary.exists():
        raise DemoCorpusError(f"bible-kjv packages lack usr/bin/bible or usr/lib/bible.data under {root}")
    # the reader wraps lines at $COLUMNS; wrapped lines are re-joined below either way
    text = _run([str(binary), "-p", str(data_dir), "gen1:1-rev22:21"],
                "decoding the KJV with the package's reader (it needs libreadline8)")
    heading, verses, prev_blank = None, [], True
    for line in text.splitlines():
        if prev_blank and _CHAPTER.match(line):
            if heading and verses:
                yield {"text": " ".join(_squash(v) for v in verses), "source": f"bible:{heading}"}
            heading, verses = line.strip(), []
        elif (m := _VERSE.match(line)) and heading:
            verses.append(m.group(2))
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()  # a verse wrapped onto the next line
        prev_blank = not line.strip()
    if heading and verses:
        yield {"text": " ".join(_squash(v) for v in verses), "source": f"bible:{heading}"}


# --------------------------------------------------------------------------- python docs (reStructuredText)

# directives whose indented body is prose worth keeping (API descriptions, admonitions); every other directive
# (code-block, toctree, index, productionlist, tables, comments, targets, ...) is dropped with its body
_PROSE_DIRECTIVES = {
    "function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod",
    "classmethod", "staticmethod", "abstractmethod", "coroutinefunction", "coroutinemethod", "awaitablefunction",
    "awaitablemethod", "describe", "object", "opcode", "cmdoption", "option", "envvar", "pdbcommand", "note",
    "warning", "seealso", "important", "tip", "hint", "attention", "caution", "danger", "admonition", "glossary",
    "impl-detail", "deprecated", "versionadded", "versionchanged", "deprecated-removed", "c:function", "c:type",
    "c:member", "c:macro", "c:var", "c:struct", "c:data", "c:enum", "c:enumerator", "c:union", "topic", "sidebar",
}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_GRID_TABLE = re.compile(r"^\s*\+[-=+]+\+\s*$")
_SIMPLE_TABLE = re.compile(r"^\s*=+( +=+)+\s*$")
_FIELD = re.compile(r"^\s*:[\w -]+:(\s|$)")
_BULLET = re.compile(r"^\s*(?:[*+-]|#\.|\d+\.|\(?[a-z0-9]\))\s+")
_ROLE = re.compile(r":(?:[\w-]+:)+`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*(?:<[^>]*>)?`__?")


def _role_text(m: re.Match) -> str:
    inner = m.group(1)
    explicit = re.match(r"^(.*?)\s*<[^>]*>$", inner, re.S)
    if explicit and explicit.group(1):
        return explicit.group(1)
    inner = inner.lstrip("!")
    if inner.startswith("~"):
        inner = inner[1:].rsplit(".", 1)[-1]
    return inner


def _rst_inline(text: str) -> str:
    text = _ROLE.sub(_role_text, text)
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = _LINK.sub(lambda m: m.group(1), text)
    text = re.sub(r"\*\*(\S.*?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(\S[^*]*?)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\|(\w+)\|", r"\1", text)
    text = text.replace("\\ ", "").replace("\\", "")
    return _squash(text)


def _is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(words) < 5 or paragraph.startswith((">>>", "$", "%")):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters / len(paragraph) > 0.8


def _rst_paragraphs(lines: list[str]) -> Iterator[str | None]:
    """Prose paragraphs of one .rst file; ``None`` marks a section title (a document boundary)."""
    para: list[str] = []

    def flush() -> Iterator[str]:
        if para:
            text = _rst_inline(" ".join(para))
            para.clear()
            if text.endswith("::"):
                text = text[:-1]  # "for example::" introduces a literal block, which is dropped
            if _is_prose(text):
                yield text

    skip_indent = -1  # >= 0: skipping the indented block opened by a line at this indentation
    table = 0  # 0: not in a table; -1: grid table (ends at a blank line); n > 0: n borders of a simple table seen
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent >= 0:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = -1
        if table:
            if table == -1 and not stripped:
                table = 0
            elif table > 0 and _SIMPLE_TABLE.match(line):
                table += 1
                if table >= 3 or i + 1 >= len(lines) or not lines[i + 1].strip():
                    table = 0
            continue
        if not stripped:
            yield from flush()
            continue
        if _UNDERLINE.match(line):
            continue  # under/overline of a section title
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if indent == 0 and _UNDERLINE.match(nxt) and len(nxt.strip()) >= len(stripped):
            yield from flush()
            yield None  # a section title starts a new document
            continue
        if _GRID_TABLE.match(line) or _SIMPLE_TABLE.match(line):
            yield from flush()
            table = -1 if _GRID_TABLE.match(line) else 1
            continue
        if stripped.startswith(".."):
            yield from flush()
            m = _DIRECTIVE.match(line)
            if not (m and m.group(2) in _PROSE_DIRECTIVES):
                skip_indent = indent  # comment, target, footnote or non-prose directive: drop its body
            continue
        if _FIELD.match(line) and not _ROLE.match(stripped):
            continue  # directive option or field-list entry
        if _BULLET.match(line):
            yield from flush()  # each list item is its own paragraph
            line = _BULLET.sub("", line)
        para.append(line.strip())
        if stripped.endswith("::"):
            yield from flush()
            skip_indent = indent  # the literal (code) block that follows
    yield from flush()


def _pydoc_documents(root: Path) -> Iterator[dict]:
    found = sorted(root.glob("usr/share/doc/python3.*/html/_sources"))
    sources = found[-1] if found else root / "usr/share/doc/python3.11/html/_sources"
    files = sorted(sources.rglob("*.rst.txt"))
    if not files:
        raise DemoCorpusError(f"the python3.X-doc package has no _sources/**/*.rst.txt under {sources}")
    for path in files:
        rel = path.relative_to(sources).as_posix()
        if rel.startswith(("whatsnew/changelog", "license", "copyright")):
            continue  # issue-number lists and legal text
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        chunk: list[str] = []
        n_words = 0
        for para in _rst_paragraphs(lines):
            if para is not None:
                chunk.append(para)
                n_words += len(para.split())
            if n_words >= PYDOC_WORDS_PER_DOCUMENT or (para is None and n_words >= PYDOC_WORDS_PER_DOCUMENT // 4):
                yield {"text": "\n".join(chunk), "source": f"pydoc:{rel}"}
                chunk, n_words = [], 0
        if n_words >= 20:
            yield {"text": "\n".join(chunk), "source": f"pydoc:{rel}"}


# --------------------------------------------------------------------------- GCIDE dictionary

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
# GCIDE's ASCII codes for special characters, e.g. [imac] (i macron), [ae], [root]
_GCIDE_ENTITIES = {
    "imac": "i", "aum": "a", "ae": "ae", "AE": "AE", "oe": "oe", "OE": "OE", "eth": "th", "thorn": "th",
    "th": "th", "ng": "ng", "yogh": "gh", "udd": "u", "deg": "°", "sect": "§", "pounds": "£", "root": "√",
    "alpha": "α", "beta": "β", "gamma": "γ", "theta": "θ", "iota": "ι", "tau": "τ", "rho": "ρ", "pi": "π",
    "phi": "φ", "times": "×", "add": "", "asl": "", "dsdot": "", "bprime": "", "break": "", "bar": "",
}
_GCIDE_SOURCE = re.compile(r"\[(?:1913 Webster|Webster 1913|WordNet|PJC|Century|Chambers|RDH|Johnson)[^\]\n]*\]")
_GCIDE_ACCENT = re.compile(r"\[(?:[=.'\"`~^,*-]([A-Za-z]{1,2})|([A-Za-z]{1,2})\^)\]")  # [=a] ['e] [i^]
_GCIDE_CODE = re.compile(r"\[([a-zA-Z]{2,6})\]")


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def _gcide_clean(raw: str) -> str:
    text = re.sub(r"\\[^\\\n]*\\", "", raw)  # pronunciations: \Re*treat"\
    text = _GCIDE_SOURCE.sub("", text)
    text = _GCIDE_CODE.sub(lambda m: _GCIDE_ENTITIES.get(m.group(1), m.group(0)), text)
    text = _GCIDE_ACCENT.sub(lambda m: m.group(1) or m.group(2), text)
    text = text.replace("{", "").replace("}", "")
    paragraphs = [_squash(p) for p in re.split(r"\n\s*\n", text)]
    text = "\n".join(p for p in paragraphs if p)
    text = re.sub(r" +([,;.])", r"\1", text)
    return unicodedata.normalize("NFC", text)


def _gcide_documents(root: Path) -> Iterator[dict]:
    base = root / "usr/share/dictd"
    if not (base / "gcide.index").exists():
        raise DemoCorpusError(f"dict-gcide has no usr/share/dictd/gcide.index under {root}")
    data = gzip.open(base / "gcide.dict.dz").read()  # dictzip is gzip-compatible
    entries: dict[tuple[int, int], str] = {}
    for line in (base / "gcide.index").read_text(encoding="utf-8", errors="replace").splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00-"):  # 00-database-* are metadata entries
            entries.setdefault((_b64(offset), _b64(length)), word)
    spans = sorted(entries)  # several headwords share one entry; keep each entry once, in file order
    total = sum(length for _, length in spans)
    keep = min(1.0, GCIDE_MAX_BYTES / max(total, 1))
    for i, (offset, length) in enumerate(spans):
        if int((i + 1) * keep) == int(i * keep):
            continue  # even subsampling over the alphabet (deterministic)
        chunk = data[offset : offset + length]
        try:
            raw = chunk.decode("utf-8")
        except UnicodeDecodeError:
            raw = chunk.decode("cp1252", errors="replace")
        text = _gcide_clean(raw)
        if len(text.split()) >= 3:
            yield {"text": text, "source": f"gcide:{entries[(offset, length)]}"}


# --------------------------------------------------------------------------- WordNet


def _wordnet_synsets(root: Path) -> Iterator[tuple[str, str, int, str]]:
    """(pos, synset offset, lexicographer file number, gloss) for every synset."""
    base = root / "usr/share/wordnet"
    for pos in ("noun", "verb", "adj", "adv"):
        path = base / f"data.{pos}"
        if not path.exists():
            raise DemoCorpusError(f"wordnet-base has no usr/share/wordnet/data.{pos} under {root}")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header
                fields, gloss = line.split(" | ", 1)
                offset, lexfile = fields.split(" ", 2)[:2]
                gloss = _squash(gloss)
                if gloss:
                    yield pos, offset, int(lexfile), gloss


def _wordnet_documents(root: Path) -> Iterator[dict]:
    for pos, offset, lexfile, gloss in _wordnet_synsets(root):
        yield {"text": gloss, "source": f"wordnet:{pos}:{offset}"}


def _wordnet_examples(root: Path) -> Iterator[dict]:
    for _, _, lexfile, gloss in _wordnet_synsets(root):
        yield {"text": gloss, "label": lexfile, "name": WORDNET_LEXNAMES[lexfile]}


BUILDERS: dict[str, Callable[[Path], Iterator[dict]]] = {
    "bible": _bible_documents,
    "pydoc": _pydoc_documents,
    "gcide": _gcide_documents,
    "wordnet": _wordnet_documents,
}
