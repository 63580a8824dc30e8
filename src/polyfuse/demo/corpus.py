"""Real text for the tiny world, from installed packages: no one on this team wrote it.

Each provider yields :class:`Document` objects in a deterministic order. Providers:

========== ============================================== =========================================
name       text                                           how it gets installed
========== ============================================== =========================================
fortunes   Debian ``fortunes`` (BSD): quotations, prose   ``apt-get install fortunes``
stdlib     the Python standard library's ``.py`` sources  ships with Python
pydoc      ``pydoc_data.topics``: language-reference prose ships with Python
pydocs     Debian ``python3.11-doc`` reST sources (PSF)   ``apt-get install python3.11-doc``
champ      CHAMP competition maths (MIT): problems,       ``pip install --no-deps champ-dataset``
           reference solutions, hints, concepts and
           GPT-3.5/4 worked solutions
========== ============================================== =========================================
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from polyfuse.corpus.documents import Document
from polyfuse.errors import DataError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def fortunes() -> Iterator[Document]:
    """Fortune cookies: one document per entry (entries are separated by ``%`` lines)."""
    if not FORTUNES_DIR.is_dir():
        raise DataError(f"{FORTUNES_DIR}: not found; the 'fortunes' corpus needs Debian's package: "
                        "apt-get install fortunes (or pick another prose provider, e.g. pydoc)")
    for path in sorted(p for p in FORTUNES_DIR.iterdir() if p.is_file() and "." not in p.name):
        entries = _read_text(path).split("\n%\n")
        for i, entry in enumerate(entries):
            text = entry.strip("%\n")
            if len(text) >= 20:
                yield Document(f"fortunes/{path.name}/{i}", text + "\n")


def stdlib() -> Iterator[Document]:
    """Python standard-library modules (tests, idlelib, turtledemo and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "turtledemo", "site-packages", "lib2to3", "__pycache__", "encodings"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts[:-1]):
            continue
        text = _read_text(path)
        if len(text) >= 200:
            yield Document(f"stdlib/{rel.as_posix()}", text)


def pydoc() -> Iterator[Document]:
    """The language-reference topics shipped as ``pydoc_data.topics`` (zero install)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"pydoc/{name}", topics[name])


def pydocs() -> Iterator[Document]:
    """The Python 3.11 documentation's reST sources (Debian ``python3.11-doc``)."""
    if not PYDOCS_DIR.is_dir():
        raise DataError(f"{PYDOCS_DIR}: not found; the 'pydocs' corpus needs Debian's package: "
                        "apt-get install python3.11-doc (or use the 'stdlib' provider)")
    for path in sorted(PYDOCS_DIR.rglob("*.rst.txt")):
        yield Document(f"pydocs/{path.relative_to(PYDOCS_DIR).as_posix()}", _read_text(path))


def champ_file() -> Path:
    """Path of CHAMP's ``v0.json`` inside the installed ``champ-dataset`` package."""
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or spec.origin is None:
        raise DataError("champ-dataset is not installed; the 'champ' maths corpus needs it: "
                        "pip install --no-deps champ-dataset==1.0.0")
    return Path(spec.origin).parent / "dataset_files" / "v0.json"


def champ() -> Iterator[Document]:
    """CHAMP maths: per problem the statement, reference solution and answer, then model solutions.

    Every document of one problem shares the id prefix ``champ/<problem>/`` so that a held-out
    split by problem never leaks a problem's solutions into training.
    """
    data = json.loads(champ_file().read_text(encoding="utf-8"))
    for pid in sorted(data["problems"]):
        prob = data["problems"][pid]
        steps = "\n".join(step["_text"] for step in prob["solution"]["steps"])
        yield Document(f"champ/{pid}/reference",
                       f"Problem: {prob['_text']}\nSolution:\n{steps}\nAnswer: {prob['_answer']}\n")
        for key in sorted(prob.get("conversations", {})):
            messages = prob["conversations"][key]["messages"]
            replies = [m["text"] for m in messages if m["role"].startswith("Model") and m.get("text")]
            if replies:
                yield Document(f"champ/{pid}/{key}", f"Problem: {prob['_text']}\nSolution:\n{replies[-1]}\n")
    for kind in ("concepts", "hints"):
        for cid in sorted(data[kind]):
            yield Document(f"champ/{kind}/{cid}", data[kind][cid]["_text"] + "\n")


PROVIDERS: dict[str, Callable[[], Iterator[Document]]] = {
    "fortunes": fortunes,
    "stdlib": stdlib,
    "pydoc": pydoc,
    "pydocs": pydocs,
    "champ": champ,
}


def group_of(doc_id: str) -> str:
    """The unit a train/held-out split must not cut through (a CHAMP problem; else the document)."""
    parts = doc_id.split("/")
    return "/".join(parts[:2]) if parts[0] == "champ" else doc_id


def is_heldout(doc_id: str, fraction: float, seed: int) -> bool:
    """Deterministic held-out assignment by a hash of the document's group and the seed."""
    digest = hashlib.blake2b(f"{seed}:{group_of(doc_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def split_documents(provider: str, *, heldout_fraction: float, seed: int, max_train_bytes: int,
                    max_heldout_bytes: int) -> tuple[list[Document], list[Document]]:
    """Documents of one provider split into (train, held-out), each capped in UTF-8 bytes.

    Documents are visited in a seeded shuffled order so that a cap takes a sample of the whole
    provider rather than its first files.
    """
    if provider not in PROVIDERS:
        raise DataError(f"unknown corpus provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    docs = list(PROVIDERS[provider]())
    order = sorted(docs, key=lambda d: hashlib.blake2b(f"{seed}/{d.id}".encode(), digest_size=8).digest())
    train: list[Document] = []
    heldout: list[Document] = []
    sizes = {"train": 0, "heldout": 0}
    for doc in order:
        split, bucket, cap = (("heldout", heldout, max_heldout_bytes)
                              if is_heldout(doc.id, heldout_fraction, seed)
                              else ("train", train, max_train_bytes))
        n = len(doc.text.encode("utf-8"))
        if sizes[split] + n <= cap:
            bucket.append(doc)
            sizes[split] += n
    return train, heldout
