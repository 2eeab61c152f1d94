"""Text: the offline standard-library corpus, WikiText's files (small ones written here in the real
format), vocabularies, and the contiguous batching of token streams."""
import collections
import math
import zipfile

import pytest
import torch

from deqlite import data
from deqlite.data import text
from deqlite.data.__main__ import main as data_main
from deqlite.data.text import EOS, UNK_CHAR, UNK_WORD


# --- the standard-library corpus -----------------------------------------------------------------

def test_stdlib_corpus_is_real_text_in_three_disjoint_splits():
    files = text.stdlib_files()
    names = {split: {n for n, _, s in files if s == split} for split in text.TEXT_SPLITS}
    assert all(names.values()), "every split has files"
    assert not (names["train"] & names["valid"] or names["train"] & names["test"]
                or names["valid"] & names["test"])
    assert len({n for n, _, _ in files}) == len(files)                 # no file read twice
    streams = {s: data.load_dataset("stdlib_chars", s) for s in text.TEXT_SPLITS}
    total = sum(len(t) for _, t, _ in files)
    assert sum(len(st) for st in streams.values()) == total > 1_000_000
    assert 60 < streams["train"].vocab_size < 200 and streams["train"].level == "char"
    for split, stream in streams.items():                   # a split is exactly its own files
        expected = "".join(t for _, t, s in files if s == split)
        expected = "".join(c if c in stream.stoi else UNK_CHAR for c in expected)
        assert stream.decode(stream.tokens) == expected, split
    assert (streams["train"].tokens == streams["train"].unk).float().mean() < 1e-4
    assert "def __init__(self" in streams["train"].decode(streams["train"].tokens[:200_000])


def test_stdlib_corpus_is_deterministic_and_its_unigram_baseline_is_its_entropy():
    first = text.stdlib_chars("valid")
    text.stdlib_files.cache_clear()
    text._stdlib_vocab.cache_clear()
    again = text.stdlib_chars("valid")
    assert torch.equal(first.tokens, again.tokens) and first.vocab == again.vocab
    assert first.vocab == tuple(sorted(first.vocab))
    train = text.stdlib_chars("train")
    counts = collections.Counter(train.tokens.tolist())
    n = sum(counts.values())
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    assert train.unigram_bits() == pytest.approx(entropy) and 3.5 < entropy < 6
    assert first.unigram_bits() == train.unigram_bits()                 # the train split's, always
    assert text.split_of("json.py") == text.split_of("json.py") in text.TEXT_SPLITS


def test_char_encode_decode_round_trip():
    stream = text.stdlib_chars("test")
    sample = "def f(x):\n    return x ** 2  # square\n"
    ids = stream.encode(sample)
    assert ids.dtype == torch.long and ids.shape == (len(sample),)
    assert stream.decode(ids) == sample and stream.decode(ids.tolist()) == sample
    assert stream.decode(ids[None]) == sample                                # a batch of one
    with pytest.raises(ValueError, match="one sequence"):
        stream.decode(torch.stack([ids, ids]))
    with pytest.raises(ValueError, match=rf"ids lie in \[0, {stream.vocab_size}\).*from -1 to"):
        stream.decode([3, -1])
    with pytest.raises(ValueError, match=rf"from 0 to {stream.vocab_size}\."):
        stream.decode(torch.tensor([0, stream.vocab_size]))
    assert stream.decode(stream.encode("é→x")) == UNK_CHAR * 2 + "x"      # rare characters
    assert len(stream.take(10)) == 10 and stream.take(10).vocab is stream.vocab


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="'train', 'valid', 'test'"):
        text.stdlib_chars("validation")


# --- WikiText files --------------------------------------------------------------------------------

TRAIN = (" \n = Valkyria Chronicles = \n \n the game is the third game in the series . \n"
         " the <unk> of the game , in Japan . \n")
VALID = " the game began in Japan . \n a zebra game \n"
TEST = " = Title = \n the series . \n"


def write_wikitext(root, folder="wikitext-103", train=TRAIN, valid=VALID, test=TEST):
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    for split, content in (("train", train), ("valid", valid), ("test", test)):
        (path / f"wiki.{split}.tokens").write_text(content, encoding="utf-8")
    return path


def test_wikitext_vocabulary_is_the_train_words_by_frequency(tmp_path):
    write_wikitext(tmp_path)
    train = data.load_dataset("wikitext103", "train", root=tmp_path)
    words = [w for line in TRAIN.split("\n")[:-1] for w in line.split() + [EOS]]
    assert len(train) == len(words) and train.level == "word"
    assert train.decode(train.tokens).split() == [w for w in words if w != EOS]
    counts = collections.Counter(words)
    expected = sorted(counts, key=lambda w: (-counts[w], words.index(w)))   # ties: first seen first
    assert list(train.vocab) == expected
    # <eos> and "the" 5× each (<eos> seen first), "game" 3×
    assert train.vocab[:3] == (EOS, "the", "game")
    assert train.train_counts.tolist() == [counts[w] for w in expected]
    assert train.unigram_bits() == pytest.approx(
        -sum(c / len(words) * math.log2(c / len(words)) for c in counts.values()))


def test_wikitext_lines_end_in_eos_and_unknown_words_become_unk(tmp_path):
    write_wikitext(tmp_path)
    valid = text.wikitext103("valid", root=tmp_path)
    # "began", "a" and "zebra" are not in the train split
    assert valid.decode(valid.tokens) == f"the game {UNK_WORD} in Japan .\n{UNK_WORD} {UNK_WORD} game\n"
    assert (valid.tokens == valid.stoi[EOS]).sum() == VALID.count("\n")
    sample = "the game is\nin Japan . \n"
    ids = valid.encode(sample)
    assert valid.decode(ids) == "the game is\nin Japan .\n"            # whitespace normalized
    assert valid.decode(ids).split() == sample.split()
    assert valid.encode("the game").tolist() == [valid.stoi["the"], valid.stoi["game"]]   # no <eos>


def test_wikitext_without_unk_in_train_still_maps_unknown_words(tmp_path):
    write_wikitext(tmp_path, folder="wikitext-2", train="a b a\n", valid="a c\n", test="b\n")
    valid = text.wikitext2("valid", root=tmp_path)
    assert valid.vocab == ("a", EOS, "b", UNK_WORD) and valid.train_counts[-1] == 0
    assert valid.decode(valid.tokens) == f"a {UNK_WORD}\n"


def test_wikitext_cache_is_written_reused_and_invalidated(tmp_path):
    folder = write_wikitext(tmp_path)
    first = text.wikitext103("test", root=tmp_path)
    assert (folder / text.CACHE_NAME).exists()
    text._wikitext_tokens.cache_clear()
    assert torch.equal(text.wikitext103("test", root=tmp_path).tokens, first.tokens)   # from file
    (folder / "wiki.test.tokens").write_text(" = Other title = \n")
    changed = text.wikitext103("test", root=tmp_path)
    assert changed.decode(changed.tokens) == f"= {UNK_WORD} {UNK_WORD} =\n"


def test_missing_wikitext_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m deqlite.data download wikitext103"):
        data.load_dataset("wikitext103", "valid", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="download wikitext2"):
        text.wikitext2(root=tmp_path)
    with pytest.raises(ValueError, match="text; augmentation applies to images"):
        data.load_dataset("stdlib_chars", augment=True)


def test_download_unpacks_the_archive_into_place(tmp_path, monkeypatch, capsys):
    """The download helper and ``python -m deqlite.data download``, served from a local file."""
    source = write_wikitext(tmp_path / "source", folder="wikitext-2")
    archive = tmp_path / "wikitext-2-v1.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in source.iterdir():
            z.write(p, f"wikitext-2/{p.name}")
    missing = (tmp_path / "nothing-here.zip").as_uri()
    monkeypatch.setitem(text.WIKITEXT, "wikitext2", ("wikitext-2", [missing, archive.as_uri()]))
    root = tmp_path / "data"
    data_main(["download", "wikitext2", "--root", str(root)])
    out = capsys.readouterr().out
    assert "wikitext2 valid: 11 tokens" in out and "wikitext2 train" in out
    assert sorted(p.name for p in root.iterdir()) == ["wikitext-2"]     # no archive or .part left
    assert text.wikitext2("test", root=root).decode(text.wikitext2("test", root=root).tokens) \
        == f"= {UNK_WORD} =\nthe series .\n"
    with pytest.raises(OSError, match="could not download wikitext2"):
        text.download_wikitext("wikitext2", root=tmp_path / "other", urls=[missing])


# --- batches ---------------------------------------------------------------------------------------

