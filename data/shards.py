"""
The modded-NanoGPT token shard format, read and written in one place.

A shard is a 256 x int32 header (magic 20240520, version 1, token count, rest zero)
followed by the tokens as uint16. Every error names the file, so a bad download or a
truncated copy is found at once rather than as a shape error deep in training.
"""

import errno
import glob
import os

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

# How to obtain the shards a glob pattern asks for, shown when none are found.
FETCH_HINTS = (
    ("finewebedu", "python data/fineweb.py --edu --train_shards N  (100M tokens each: train_tokens / 1e8, e.g. 26 "
                   "for d12's 2.5B)"),
    ("fineweb", "python data/fineweb.py --train_shards N  (100M tokens each: train_tokens / 1e8, e.g. 26 for "
                "d12's 2.5B)"),
    ("shakespeare", "git checkout -- data/shakespeare  (the embedded corpus is part of the repository)"),
    ("modarith", "python data/modarith.py  (the toy task's sequences, generated in seconds)"),
    ("wikitext103", "python data/wikitext.py --name wikitext-103"),  # before "wikitext", which it contains
    ("wikitext", "python data/wikitext.py --name wikitext-2"),
)


class ShardError(ValueError):
    pass


def fetch_hint(pattern):
    for key, command in FETCH_HINTS:
        if key in os.path.basename(pattern) or key in pattern:
            return command
    return "python data/prepare.py --input 'your_texts/*.txt' --out DIR --name NAME"


def find_shards(pattern):
    """Sorted list of files matching the glob; an error with the fetch command when there are none."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise ShardError(f"no token shards match {pattern!r}; fetch or build them with: {fetch_hint(pattern)}")
    return files


def read_header(path):
    """Validate the header and the file size of a shard; return its token count."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror}); fetch it with: {fetch_hint(path)}") from None
    if len(head) < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.frombuffer(head, dtype=np.int32)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: magic number {header[0]} is not {MAGIC}; not a token shard "
                         "(expected the modded-NanoGPT format written by data/prepare.py)")
    if header[1] != VERSION:
        raise ShardError(f"{path}: shard version {header[1]} is not supported (expected {VERSION})")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        raise ShardError(f"{path}: header promises {n_tokens} tokens ({expected} bytes) but the file has "
                         f"{size} bytes; it is truncated or corrupt, fetch it again")
    return n_tokens


def load_tokens(path):
    """The tokens of a shard as a read-only uint16 memory map (validated first)."""
    n_tokens = read_header(path)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def check_vocab(tokens, path, vocab_size):
    top = int(tokens.max()) if len(tokens) else 0
    if top >= vocab_size:
        raise ShardError(f"{path}: token id {top} is outside the model's vocab_size={vocab_size}")


def load_prefix(files, n_tokens, vocab_size, key="val_tokens"):
    """The first n_tokens + 1 tokens of the shards as an int64 array: the fixed validation slice (and
    the spectral probe set) that every evaluation uses. `key` names the setting in the error."""
    parts, have = [], 0
    for path in files:
        if have > n_tokens:
            break
        tokens = np.asarray(load_tokens(path)[: n_tokens + 1 - have], dtype=np.int64)
        check_vocab(tokens, path, vocab_size)
        parts.append(tokens)
        have += len(tokens)
    if have < n_tokens + 1:
        raise ShardError(f"{key}={n_tokens} but the shards {files} hold only {have} tokens; "
                         f"lower {key} to at most {have - 1}")
    return np.concatenate(parts)


class WriteError(OSError):
    """A file that could not be written (no space left, no permission); nothing half-written is left."""


def atomic_write(path, write):
    """write(f) into path + '.tmp<pid>', fsync, rename: readers see the old file or the new, never half.
    A write that fails removes its temporary file (a full disk would otherwise stay full) and raises
    WriteError naming the folder; one killed outright leaves it behind, for the next run's
    rundir.remove_stale_temporaries."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if any(isinstance(x, OSError) and x.errno == errno.ENOSPC for x in (e, e.__context__, e.__cause__)):
            # (a writer such as torch.save may report a full disk as its own error, the OSError behind it)
            raise WriteError(f"no space left on {os.path.dirname(os.path.abspath(path))} while writing "
                             f"{os.path.basename(path)}; free space there or write elsewhere") from None
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise WriteError(f"cannot write {path}: {e.strerror}") from None
        raise


def write_shard(path, tokens):
    """Write tokens (values < 2**16) as a shard, atomically: a reader never sees half a file."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise ShardError(f"{path}: token ids must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, tokens.size)
    atomic_write(path, lambda f: (f.write(header.tobytes()), f.write(tokens.astype(np.uint16).tobytes())))
