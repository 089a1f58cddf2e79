"""Maintainer script: collect the offline corpus shipped in fastdume/data/texts/.

Run once on a Debian machine with CPython installed (`python -m fastdume.data.build_corpus`);
users never run it, they get the compressed result with the package. Sources and their licences
are listed in fastdume/data/LICENSES.md. Output is deterministic for a given machine: files are
visited in sorted order and documents are kept or dropped by a content hash, not at random.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import sysconfig
from pathlib import Path

from fastdume._atomic import atomic_file
from fastdume.data import mathgen

HERE = Path(__file__).resolve().parent
CORPUS_DIR = HERE / "texts"  # a package (has __init__.py), so setuptools ships its files
TARGET_CHARS = 1_100_000  # per domain: ~300k tokens, enough for the tiny zoo, small to ship
DOC_CHARS = (400, 2400)  # documents are grouped paragraphs/definitions within this size range


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _group(blocks: list[str], sep: str) -> list[str]:
    """Greedily join consecutive blocks into documents of DOC_CHARS size."""
    lo, hi = DOC_CHARS
    docs, cur = [], ""
    for b in _split_long(blocks, hi):
        b = b.strip("\n")
        if not b.strip():
            continue
        if cur and len(cur) + len(b) > hi:
            docs.append(cur)
            cur = ""
        cur = f"{cur}{sep}{b}" if cur else b[: hi * 2]
    if cur:
        docs.append(cur)
    return [d for d in docs if len(d) >= lo]


def _split_long(blocks: list[str], hi: int) -> list[str]:
    """Cut blocks longer than `hi` at blank lines (a long class into its methods)."""
    out = []
    for b in blocks:
        out += [b] if len(b) <= hi else re.split(r"\n(?=\s*\n)", b)
    return out


def _take(docs: list[str], target: int) -> list[str]:
    """Deduplicate, then keep a hash-ordered subset of about `target` characters."""
    unique = {_digest(" ".join(d.split())): d for d in docs}
    out, total = [], 0
    for key in sorted(unique):
        if total >= target:
            break
        out.append(unique[key])
        total += len(unique[key])
    return out


def code_docs() -> list[str]:
    """CPython's own standard library, cut at top-level definitions."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "idlelib", "site-packages", "lib2to3", "encodings", "turtledemo", "config-")
    blocks = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).as_posix()
        if rel.startswith(skip) or "/test" in rel:
            continue
        src = path.read_text(encoding="utf-8", errors="replace")
        # A new block starts at every top-level def/class/decorator line.
        blocks += re.split(r"\n(?=(?:def |class |async def |@))", src)
    return _group(blocks, "\n")


def _license_files() -> list[Path]:
    files = sorted(Path("/usr/share/common-licenses").glob("*"))
    files += sorted(Path("/usr/share/doc").glob("*/copyright"))
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"]]
    for root in site:
        for pat in ("*.dist-info/LICEN[CS]E*", "*.dist-info/licenses/*", "*.dist-info/COPYING*"):
            files += sorted(Path(p) for p in glob.glob(os.path.join(root, pat)))
    return [f for f in files if f.is_file() and not f.is_symlink()]


def legal_docs() -> list[str]:
    """Licence texts and Debian copyright files found on this machine."""
    blocks = []
    for path in _license_files():
        text = path.read_bytes()
        if path.suffix == ".gz":
            text = gzip.decompress(text)
        blocks += re.split(r"\n\s*\n", text.decode("utf-8", errors="replace"))
    return _group(blocks, "\n\n")


def _is_code_block(block: str) -> bool:
    lines = [ln for ln in block.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("   "):
        return False
    text = " ".join(lines)
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return ">>>" in text or "::=" in text or letters < 0.88 * len(text)


def _prose_paragraphs(text: str) -> list[str]:
    paras = re.split(r"\n\s*\n", text)
    return [p for p in paras if not _is_code_block(p) and not set(p.strip()) <= set("*=-")]


def _info_nodes() -> list[str]:
    """Nodes of the GNU info manuals, without menus, indices and licence appendices."""
    nodes = []
    for path in sorted(Path("/usr/share/info").glob("*.info*.gz")):
        for node in gzip.decompress(path.read_bytes()).decode("utf-8", "replace").split("\x1f"):
            head, _, body = node.strip("\n").partition("\n")
            title = re.search(r"Node: ([^,]*)", head)
            if not title or re.search(r"Licen[cs]e|Copying|Index|Top", title.group(1)):
                continue
            nodes.append(body.split("* Menu:")[0])
    return nodes


def prose_docs() -> list[str]:
    """English prose of the CPython and GNU manuals shipped on the machine (code removed)."""
    from pydoc_data.topics import topics

    blocks = []
    for text in [topics[k] for k in sorted(topics)] + _info_nodes():
        blocks += _prose_paragraphs(text)
    return _group(blocks, "\n\n")


def math_docs() -> list[str]:
    docs = mathgen.generate(num_docs=2000, seed=1234)
    return _group(docs, "\n\n")


SOURCES = {"code": code_docs, "legal": legal_docs, "math": math_docs, "prose": prose_docs}


def write_domain(name: str, docs: list[str], out_dir: Path) -> Path:
    path = out_dir / f"{name}.jsonl.xz"
    payload = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    with atomic_file(path) as tmp:
        tmp.write_bytes(lzma.compress(payload.encode(), preset=9 | lzma.PRESET_EXTREME))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CORPUS_DIR)
    parser.add_argument("--chars", type=int, default=TARGET_CHARS, help="characters per domain")
    args = parser.parse_args(argv)
    for name, fn in SOURCES.items():
        docs = _take(fn(), args.chars)
        path = write_domain(name, docs, args.out)
        size = sum(map(len, docs))
        print(f"{name:6s} {len(docs):5d} docs {size / 1e6:5.2f} M chars -> {path.stat().st_size} B")


if __name__ == "__main__":
    main()
