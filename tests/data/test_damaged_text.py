"""Nothing lost, nothing silent, for text: a WikiText file that is damaged, not UTF-8, empty or
too short is an error that names the file, says what is wrong and what to do; a damaged token
cache (the kit's own file) is rebuilt with a warning; a byte-order mark is not part of a word."""
import re
import warnings
import zipfile

import pytest
import torch

from test_text import TRAIN, write_wikitext

from deqlite.data import integrity, text
from deqlite.data.__main__ import main as data_main
from deqlite.data.batches import StreamBatches, eval_windows, first_windows
from deqlite.data.integrity import DataFileError


@pytest.fixture(autouse=True)
def _fresh_token_cache():
    """Every test reads its files anew (the per-process cache would hide a changed file)."""
    text._wikitext_tokens.cache_clear()
    yield
    text._wikitext_tokens.cache_clear()


# --- WikiText files ------------------------------------------------------------------------------

def test_a_byte_order_mark_is_not_read_as_part_of_the_first_word(tmp_path):
    plain = text.wikitext103("train", root=write_wikitext(tmp_path / "plain").parent)
    bom = write_wikitext(tmp_path / "bom", train="\ufeff" + TRAIN.lstrip())
    (bom / "wiki.valid.tokens").write_bytes(b"\xef\xbb\xbf" + b"the game .\n")   # the raw BOM
    train = text.wikitext103("train", root=bom.parent)
    assert not any(w.startswith("\ufeff") for w in train.vocab)
    assert set(train.vocab) == set(plain.vocab)
    valid = text.wikitext103("valid", root=bom.parent)
    assert valid.decode(valid.tokens) == "the game .\n"                 # no <unk> for "\ufeffthe"


def test_wikitext_file_that_is_not_utf8_names_the_file_the_line_and_what_to_do(tmp_path):
    folder = write_wikitext(tmp_path)
    (folder / "wiki.valid.tokens").write_bytes(b" the game .\n a b\n caf\xe9 \xff\n")   # Latin-1
    with pytest.raises(DataFileError, match=r"wiki\.valid\.tokens: it is not UTF-8 text.*line 3, "
                                            r"byte 5 \(b'\\xe9 \\xff\\n'\)") as err:
        text.wikitext103("train", root=tmp_path)
    assert err.value.path == folder / "wiki.valid.tokens"
    assert "python -m deqlite.data download wikitext103 --root" in str(err.value)
    assert "DEQLITE_DATA" in str(err.value)
    with pytest.raises(SystemExit, match="wiki.valid.tokens: it is not UTF-8"):
        data_main(["download", "wikitext103", "--root", str(tmp_path)])


@pytest.mark.parametrize("content, problem", [("", "the file is empty (0 bytes)"),
                                              (" \n\n \n", "the file has no words (5 bytes")])
def test_an_empty_wikitext_file_is_named_not_blamed_on_the_batch_size(tmp_path, content, problem):
    write_wikitext(tmp_path, folder="wikitext-2", train=content)
    with pytest.raises(DataFileError, match=r"wiki\.train\.tokens: " + re.escape(problem)) as err:
        text.wikitext2("valid", root=tmp_path)
    assert "download wikitext2" in str(err.value) and "batch size" not in str(err.value)


def test_a_text_shorter_than_one_window_says_how_many_tokens_it_has_and_needs(tmp_path):
    write_wikitext(tmp_path)
    train = text.wikitext103("train", root=tmp_path)
    assert len(train) == 28
    with pytest.raises(ValueError, match=r"wikitext103 'train' \(.*wiki\.train\.tokens\) has 28 "
                                         r"tokens, fewer than .* 4 × 16 \+ 1 = 65"):
        StreamBatches(train, 4, 16)
    assert StreamBatches(train, 3, 9).steps_per_epoch == 1              # 28 = 3 × 9 + 1: just enough
    with pytest.raises(ValueError, match=r"has 28 tokens; evaluating it in batch_size = 30 rows "
                                         r"needs at least 31"):
        next(eval_windows(train, 30, 8))
    with pytest.raises(ValueError, match="the token stream has 1 token"):
        first_windows(torch.tensor([3]), 2, 8)
    with pytest.raises(ValueError, match=r"a TokenStream or a 1-D tensor of ids, got \(2, 5\)"):
        StreamBatches(torch.zeros(2, 5, dtype=torch.long), 1, 2)


def test_missing_wikitext_files_are_named(tmp_path):
    folder = write_wikitext(tmp_path)
    (folder / "wiki.test.tokens").unlink()
    with pytest.raises(FileNotFoundError, match="wiki.test.tokens missing"):
        text.wikitext103(root=tmp_path)


# --- the token cache -----------------------------------------------------------------------------

def _flip_a_token_byte(cache):
    """Flip one byte inside the stored train tokens (torch.load would not notice)."""
    saved = torch.load(cache, weights_only=True)
    raw, tokens = bytearray(cache.read_bytes()), saved["tensors"]["train"].numpy().tobytes()
    at = raw.find(tokens)
    assert at > 0
    raw[at + len(tokens) // 2] ^= 0x01
    cache.write_bytes(bytes(raw))


def _shorten_a_split(cache):
    saved = torch.load(cache, weights_only=True)
    saved["tensors"]["valid"] = saved["tensors"]["valid"][:-2]
    torch.save(saved, cache)


DAMAGES = {
    "truncated": (lambda c: c.write_bytes(c.read_bytes()[:len(c.read_bytes()) // 2]), "does not load"),
    "empty": (lambda c: c.write_bytes(b""), "does not load"),
    "not a torch file": (lambda c: c.write_text("hello"), "does not load"),
    "not a dict": (lambda c: torch.save([1, 2], c), "it holds a list, not a cache"),
    "a flipped byte": (_flip_a_token_byte, "the checksum of 'train' does not match"),
    "a shortened split": (_shorten_a_split, "'valid' has 9 values, its header says 11"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_token_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    folder = write_wikitext(tmp_path)
    cache = folder / text.CACHE_NAME
    expected = {s: text.wikitext103(s, root=tmp_path).tokens for s in text.TEXT_SPLITS}
    assert cache.exists()
    spoil, problem = DAMAGES[damage]
    spoil(cache)
    text._wikitext_tokens.cache_clear()
    with pytest.warns(UserWarning, match=f"the cache .*{text.CACHE_NAME} is damaged: .*{problem}.*"
                                         f"Rebuilding it from the token files"):
        again = text.wikitext103("valid", root=tmp_path)
    assert torch.equal(again.tokens, expected["valid"])
    rewritten = cache.stat().st_ino
    text._wikitext_tokens.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                   # rewritten: no warning now
        assert torch.equal(text.wikitext103("train", root=tmp_path).tokens, expected["train"])
    assert cache.stat().st_ino == rewritten                              # and read, not rebuilt
    assert sorted(p.name for p in folder.iterdir()) == [             # no temporary file left over
        text.CACHE_NAME, "wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]


def test_an_older_cache_is_replaced_without_a_warning(tmp_path):
    folder = write_wikitext(tmp_path)
    torch.save({"vocab": ["x"], "train": torch.zeros(3, dtype=torch.int32), "signature": []},
               folder / text.CACHE_NAME)                                # the layout of deqlite ≤ 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(text.wikitext103("train", root=tmp_path)) == 28
    assert integrity.load_checked(folder / text.CACHE_NAME, rebuild="") is not None


# --- downloading WikiText ------------------------------------------------------------------------

def test_download_skips_a_url_that_serves_no_zip_and_leaves_other_files_alone(tmp_path):
    source = write_wikitext(tmp_path / "source", folder="wikitext-2")
    archive = tmp_path / "wikitext-2-v1.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in source.iterdir():
            z.write(p, f"wikitext-2/{p.name}")
    html = tmp_path / "error.html"
    html.write_text("<html>Service Unavailable</html>")
    folder = tmp_path / "data" / "wikitext-2"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")                           # an incomplete copy + mine
    (folder / "wiki.train.tokens").write_text("old")
    with pytest.raises(OSError, match=r"error\.html: what came is no zip archive \(it begins b'<html>"):
        text.download_wikitext("wikitext2", root=tmp_path / "data", urls=[html.as_uri()])
    text.download_wikitext("wikitext2", root=tmp_path / "data", urls=[html.as_uri(), archive.as_uri()])
    assert sorted(p.name for p in folder.iterdir()) == [
        "notes.txt", "wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "wiki.train.tokens").read_text() == TRAIN
    assert sorted(p.name for p in folder.parent.iterdir()) == ["wikitext-2"]   # no temporary left
