"""Text for language modeling: token streams, their vocabularies, and the corpora.

A language model reads a long text as one stream of tokens t_0, t_1, ..., t_{N-1} and learns
p(t_{i+1} | t_0 .. t_i); its loss is the mean negative log-likelihood per token in nats,
ℓ = −(1/N) Σ ln p(t_{i+1} | context). In bits per token ℓ / ln 2 (for characters: bits per
character, bpc), and as a perplexity exp(ℓ), the number of equally likely tokens that would
leave the model as unsure as it is.

Datasets (each ``fn(split)`` with split "train", "valid" or "test" returns a ``TokenStream``)::

    ``stdlib_chars``  offline, characters: the source text (code, comments and docstrings: real
                      English and real Python) of the top-level modules of the running Python's
                      standard library, about 4 MB. Files are read in sorted order up to a size
                      budget and assigned whole to a split by a stable hash of their name (~90 /
                      5 / 5 %), so the splits are contiguous blocks that cannot share a file. The
                      same Python version gives the same corpus; other versions give slightly
                      different text (modules change between releases; a distribution that
                      patches the standard library changes it too).
    ``wikitext103``   words: WikiText-103 (Merity et al., "Pointer Sentinel Mixture Models", 2016),
    ``wikitext2``     and its small sibling WikiText-2, read from ``ROOT/wikitext-103/wiki.{train,
                      valid,test}.tokens`` (``ROOT/wikitext-2/...``), ROOT as in ``deqlite.data``.
                      The standard preprocessing: split each line on whitespace and end it with
                      ``<eos>``; the vocabulary is every word of the train split, most frequent
                      first (ties: first seen first), about 267k words for WikiText-103; the
                      files already spell rare words ``<unk>``. Tokenizing WikiText-103 takes a
                      minute, so the result is also cached beside the files (``CACHE_NAME``),
                      with checksums: a damaged cache is rebuilt, with a warning. The files are
                      UTF-8 (a byte-order mark at the start is dropped); a file that is not, or
                      is empty, is an error that names it (``integrity.DataFileError``).
                      Download: ``python -m deqlite.data download wikitext103`` (or wikitext2).

Batches: ``deqlite.data.batches.StreamBatches`` cuts a stream into rows and windows.
"""
from __future__ import annotations

import array
import collections
import functools
import math
import os
import shutil
import sysconfig
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .._files import data_root
from .._validate import check_range, lookup
from .integrity import DataFileError, first_non_utf8, load_checked, redownload, save_checked

TEXT_SPLITS = ("train", "valid", "test")
UNK_CHAR = "\ufffd"          # the Unicode replacement character stands for every rare character
UNK_WORD, EOS = "<unk>", "<eos>"


# --- a stream of tokens and its vocabulary -------------------------------------------------------

@dataclass(frozen=True, eq=False)
class TokenStream:
    """One split of a text as a 1-D LongTensor of token ids, with the vocabulary to read it.

    Attributes:
        tokens: (N,) int64 token ids (shared with the per-process cache: do not modify in place).
        vocab: id → token ("itos"): single characters for ``level="char"``, words for "word".
        level: "char" or "word".
        train_counts: (V,) how often each token occurs in the *train* split (the same tensor in
            every split of a corpus): the unigram baseline.
        name, split: which corpus and split it is.
        source: the file (or folder) it was read from, for messages ("" if none).
    """
    tokens: torch.Tensor
    vocab: tuple
    level: str
    train_counts: torch.Tensor
    name: str = ""
    split: str = ""
    source: str = ""

    @functools.cached_property
    def stoi(self) -> dict:
        """token → id."""
        return {t: i for i, t in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def unk(self) -> int:
        """The id that unknown tokens get (``"\\ufffd"`` for characters, ``<unk>`` for words)."""
        return self.stoi[UNK_CHAR if self.level == "char" else UNK_WORD]

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of `text`, unknown tokens as ``unk``. Words: each line split on whitespace,
        and ``<eos>`` for every newline (as the files are read; a prompt without a trailing
        newline gets no final ``<eos>``)."""
        if self.level == "char":
            return torch.as_tensor(_encode_chars(text, self.vocab), dtype=torch.long)
        lines = text.split("\n")
        words = [w for line in lines[:-1] for w in line.split() + [EOS]] + lines[-1].split()
        get, unk = self.stoi.get, self.unk
        return torch.tensor([get(w, unk) for w in words], dtype=torch.long)

    def decode(self, tokens) -> str:
        """The text of token ids (a tensor or a list; a (1, T) batch of one is fine): characters
        joined, or words joined by spaces with ``<eos>`` written as a newline. An id outside the
        vocabulary is an error (a negative one would otherwise index from the end)."""
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() > 1 and tokens.shape[0] != 1:
                raise ValueError(f"decode reads one sequence; got shape {tuple(tokens.shape)}: "
                                 f"decode the rows one by one, e.g. decode(tokens[0]).")
            tokens = tokens.flatten()
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if ids and not 0 <= min(ids) <= max(ids) < len(self.vocab):    # -1 would read as vocab[-1]
            raise ValueError(f"token ids lie in [0, {len(self.vocab)}) (the vocabulary's size); "
                             f"got ids from {min(ids)} to {max(ids)}.")
        pieces = [self.vocab[i] for i in ids]
        if self.level == "char":
            return "".join(pieces)
        lines, line = [], []
        for w in pieces:
            if w == EOS:
                lines.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(w)
        return "".join(lines) + " ".join(line)

    def unigram_bits(self) -> float:
        """H = −Σ p_i log₂ p_i of the train split's token frequencies p, in bits per token: what
        a model that ignores the context (predicts p every time) pays on the training text, the
        baseline a language model must beat."""
        p = self.train_counts[self.train_counts > 0].double()
        p = p / p.sum()
        return float(-(p * p.log2()).sum())

    def take(self, n: int) -> "TokenStream":
        """The first n tokens (all if there are fewer), for quick runs."""
        check_range(n, "n", low=2, integer=True)
        return TokenStream(self.tokens[:n], self.vocab, self.level, self.train_counts,
                           self.name, self.split, self.source)

    @property
    def where(self) -> str:
        """The stream in words, for error messages: ``wikitext2 'train' (data/…/wiki.train.tokens)``."""
        return f"{self.name} {self.split!r}" + (f" ({self.source})" if self.source else "")

    def __repr__(self) -> str:
        return (f"TokenStream({self.name!r}, split={self.split!r}, {len(self):,} {self.level} "
                f"tokens, vocabulary of {self.vocab_size:,})")


def _encode_chars(text: str, vocab: tuple) -> np.ndarray:
    """Character ids through numpy: code points looked up in the sorted code points of `vocab`
    (characters outside it → the id of ``UNK_CHAR``)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.array([ord(c) for c in vocab], dtype=np.uint32)       # sorted: vocab is sorted
    ids = np.searchsorted(table, points).clip(max=len(table) - 1)
    known = table[ids] == points
    return np.where(known, ids, vocab.index(UNK_CHAR)).astype(np.int64)


def _check_text_split(split: str) -> None:
    lookup(TEXT_SPLITS, split, "split of a text dataset")


# --- the offline corpus: Python's standard library -----------------------------------------------

STDLIB_MAX_CHARS = 4_000_000      # the corpus's size budget, in characters
MIN_CHAR_COUNT = 10               # rarer characters (in train) all read as UNK_CHAR


def split_of(name: str) -> str:
    """The split a file belongs to, from a stable hash of its name (CRC-32, unlike ``hash()`` the
    same in every process): 90 % train, 5 % valid, 5 % test of the files."""
    bucket = zlib.crc32(name.encode()) % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


@functools.lru_cache(maxsize=None)
def stdlib_files(max_chars: int = STDLIB_MAX_CHARS) -> tuple:
    """``((file name, text, split), ...)``: the top-level ``.py`` modules of the standard library,
    in sorted order, while their total stays within `max_chars` (the build-specific
    ``_sysconfigdata*`` file left out). Read once per process."""
    check_range(max_chars, "max_chars", low=1, integer=True)
    folder = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_sysconfigdata"):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        if total + len(text) > max_chars:
            break
        files.append((path.name, text, split_of(path.name)))
        total += len(text)
    return tuple(files)


@functools.lru_cache(maxsize=None)
def _stdlib_vocab(max_chars: int) -> tuple[tuple, torch.Tensor]:
    """(vocabulary, train counts): the characters seen at least MIN_CHAR_COUNT times in the train
    split, sorted, plus UNK_CHAR."""
    counts = collections.Counter()
    for _, text, split in stdlib_files(max_chars):
        if split == "train":
            counts.update(text)
    vocab = tuple(sorted({c for c, n in counts.items() if n >= MIN_CHAR_COUNT} | {UNK_CHAR}))
    train = torch.zeros(len(vocab), dtype=torch.long)
    for c, n in counts.items():
        i = vocab.index(c) if c in vocab else vocab.index(UNK_CHAR)
        train[i] += n
    return vocab, train


def stdlib_chars(split: str = "train", *, max_chars: int = STDLIB_MAX_CHARS) -> TokenStream:
    """The character corpus of the standard library's source (see the module docstring)."""
    _check_text_split(split)
    vocab, train_counts = _stdlib_vocab(max_chars)
    text = "".join(t for _, t, s in stdlib_files(max_chars) if s == split)
    return TokenStream(torch.from_numpy(_encode_chars(text, vocab)), vocab, "char", train_counts,
                       "stdlib_chars", split, sysconfig.get_paths()["stdlib"])


# --- WikiText ------------------------------------------------------------------------------------

_ORIGINAL = "https://s3.amazonaws.com/research.metamind.io/wikitext"
WIKITEXT = {   # name: (folder, archive URLs: the maintained mirror first, the original after it)
    "wikitext103": ("wikitext-103", ["https://wikitext.smerity.com/wikitext-103-v1.zip",
                                     f"{_ORIGINAL}/wikitext-103-v1.zip"]),
    "wikitext2": ("wikitext-2", ["https://wikitext.smerity.com/wikitext-2-v1.zip",
                                 f"{_ORIGINAL}/wikitext-2-v1.zip"]),
}
CACHE_NAME = "deqlite-tokens-v1.pt"


def _wikitext_folder(name: str, root) -> Path:
    return data_root(root) / WIKITEXT[name][0]


def _token_files(folder: Path) -> dict:
    return {split: folder / f"wiki.{split}.tokens" for split in TEXT_SPLITS}


def _missing_wikitext(name: str, folder: Path) -> FileNotFoundError:
    size = "about 180 MB, 540 MB unpacked" if name == "wikitext103" else "about 4 MB"
    missing = [p.name for p in _token_files(folder).values() if not p.exists()]
    return FileNotFoundError(
        f"{name} is not under {folder}: {', '.join(missing)} missing (it needs wiki.train.tokens, "
        f"wiki.valid.tokens and wiki.test.tokens). Download it ({size}) with\n"
        f"    python -m deqlite.data download {name} --root {folder.parent}\n"
        f"or pass download=True, or point $DEQLITE_DATA at a folder that has it.")


def _damaged(path: Path, problem: str) -> DataFileError:
    """The error for a WikiText file that is there but unusable: names it, says what to do."""
    name = next((n for n, (f, _) in WIKITEXT.items() if f == path.parent.name), "wikitext103")
    return DataFileError(path, problem, redownload(path, name, path.parent.parent))


def _read_words(path: Path, stoi: dict) -> np.ndarray:
    """The ids of every word of every line of `path`, each line ended by ``<eos>``. `stoi` is a
    ``defaultdict`` that numbers unseen words as they come (the train split), or a plain dict
    whose unknown words become ``<unk>`` (the other splits). The file is UTF-8; a byte-order
    mark at its start ("utf-8-sig") is dropped, not read as part of the first word."""
    ids = array.array("q")
    if isinstance(stoi, collections.defaultdict):
        lookup_word = stoi.__getitem__
    else:
        unk = stoi[UNK_WORD]
        lookup_word = lambda w: stoi.get(w, unk)  # noqa: E731
    eos = lookup_word(EOS)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for line in fh:
                ids.extend(map(lookup_word, line.split()))
                ids.append(eos)
    except UnicodeDecodeError:
        raise _damaged(path, f"it is not UTF-8 text, as WikiText's files are: invalid bytes at "
                             f"{first_non_utf8(path)}.") from None
    ids = np.frombuffer(ids, dtype=np.int64)
    if not (ids != eos).any():
        size = path.stat().st_size
        raise _damaged(path, "the file is empty (0 bytes)" if size == 0 else
                       f"the file has no words ({size:,} bytes of blank lines)")
    return ids


def tokenize_wikitext(folder: Path) -> dict:
    """``{"vocab": [...], "train"/"valid"/"test": int32 ids}`` from the three token files. The
    train split is read once: words are numbered as first seen, counted, and renumbered by
    frequency (a stable sort keeps first-seen order among equals)."""
    first_seen = collections.defaultdict()
    first_seen.default_factory = first_seen.__len__       # a new word gets the next number
    files = _token_files(folder)
    raw = _read_words(files["train"], first_seen)
    counts = np.bincount(raw, minlength=len(first_seen))
    order = np.argsort(-counts, kind="stable")             # new id → first-seen id
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))                    # first-seen id → new id
    words = list(first_seen)
    vocab = [words[i] for i in order]
    if UNK_WORD not in first_seen:
        vocab.append(UNK_WORD)                              # unknown words of valid/test need an id
    stoi = {w: i for i, w in enumerate(vocab)}
    out = {"vocab": vocab, "train": torch.from_numpy(rank[raw].astype(np.int32))}
    for split in ("valid", "test"):
        out[split] = torch.from_numpy(_read_words(files[split], stoi).astype(np.int32))
    return out


def _signature(files: dict) -> list:
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files.values()]


@functools.lru_cache(maxsize=4)
def _wikitext_tokens(folder: Path, signature: tuple) -> tuple:
    """(vocab, {split: int64 ids}, train counts) for a folder, once per process and file version;
    read from / written to the cache beside the token files. The cache is checked
    (``integrity.load_checked``): one written for other files (another `signature`) is rebuilt,
    and so, with a warning, is a damaged one (truncated, or its data not its header's)."""
    cache = folder / CACHE_NAME
    saved = load_checked(cache, rebuild="Rebuilding it from the token files (WikiText-103: "
                                        "about a minute).")
    if saved is not None and saved[0].get("signature") == list(signature) \
            and set(saved[1]) == set(TEXT_SPLITS):
        meta, tensors = saved
    else:
        data = tokenize_wikitext(folder)
        meta = {"signature": list(signature), "vocab": data["vocab"]}
        tensors = {s: data[s] for s in TEXT_SPLITS}
        _save_cache(cache, tensors, meta)
    splits = {s: tensors[s].long() for s in TEXT_SPLITS}
    counts = torch.bincount(splits["train"], minlength=len(meta["vocab"]))
    return tuple(meta["vocab"]), splits, counts


def _save_cache(path: Path, tensors: dict, meta: dict) -> None:
    """Write atomically (``save_checked``); a read-only data folder just goes without a cache."""
    try:
        save_checked(path, tensors, meta)
    except OSError as e:
        warnings.warn(f"could not cache the tokenized text in {path} ({e}); it is tokenized "
                      f"again in every process.", stacklevel=3)


def load_wikitext(name: str, split: str = "train", *, root=None,
                  download: bool = False) -> TokenStream:
    """WikiText-103 or WikiText-2 (`name` "wikitext103" / "wikitext2") as word tokens."""
    lookup(WIKITEXT, name, "WikiText dataset")
    _check_text_split(split)
    folder = _wikitext_folder(name, root)
    files = _token_files(folder)
    if download and not all(p.exists() for p in files.values()):
        download_wikitext(name, root=root)
    if not all(p.exists() for p in files.values()):
        raise _missing_wikitext(name, folder)
    vocab, splits, counts = _wikitext_tokens(folder, tuple(_signature(files)))
    return TokenStream(splits[split], vocab, "word", counts, name, split, str(files[split]))


def wikitext103(split: str = "train", *, root=None, download: bool = False) -> TokenStream:
    """WikiText-103: 103M train tokens, 218k valid, 246k test; vocabulary of 267,735 words."""
    return load_wikitext("wikitext103", split, root=root, download=download)


def wikitext2(split: str = "train", *, root=None, download: bool = False) -> TokenStream:
    """WikiText-2: the same format, 2.1M train tokens, vocabulary of 33,278 words."""
    return load_wikitext("wikitext2", split, root=root, download=download)


def _fetch(url: str, part: Path, name: str) -> None:
    """Download `url` into the file `part` with a progress bar; an OSError if that fails or what
    came is no zip archive (a server's HTML error page, say)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as fh:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name} ← {url}") as bar:
            while chunk := response.read(1 << 20):
                fh.write(chunk)
                bar.update(len(chunk))
    if not zipfile.is_zipfile(part):
        with open(part, "rb") as fh:
            raise OSError(f"what came is no zip archive (it begins {fh.read(32)!r})")


def download_wikitext(name: str, *, root=None, urls: Optional[list] = None) -> Path:
    """Fetch the archive (a ``.part`` file, renamed when complete and a zip archive; else the
    next URL is tried), unpack it into a temporary folder and move its token files into place:
    an interrupted download leaves no half-written dataset, and other files in the dataset's
    folder are left alone. Returns the dataset's folder."""
    folder_name, default_urls = lookup(WIKITEXT, name, "WikiText dataset")
    folder = _wikitext_folder(name, root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    archive = folder.parent / f"{folder_name}.zip"
    part = archive.with_name(archive.name + ".part")
    errors = []
    for url in urls or default_urls:
        try:
            _fetch(url, part, name)
            os.replace(part, archive)
            break
        except OSError as e:                    # URLError and HTTPError are OSErrors
            errors.append(f"{url}: {e}")
            part.unlink(missing_ok=True)
    else:
        raise OSError(f"could not download {name}:\n  " + "\n  ".join(errors))
    unpacked = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder_name}."))
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(unpacked)
        inner = unpacked / folder_name
        if not all(p.exists() for p in _token_files(inner).values()):
            raise OSError(f"the archive {archive} has no {folder_name}/wiki.*.tokens files.")
        if not folder.exists():
            os.replace(inner, folder)
        else:                                   # an incomplete earlier copy: replace its files
            for p in inner.iterdir():
                os.replace(p, folder / p.name)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)     # the temporary folder (ours) goes
    archive.unlink()
    return folder


def bits(nats: float) -> float:
    """Nats per token → bits per token (÷ ln 2)."""
    return nats / math.log(2)
