"""scripts/make_longtext_eval.py: cleaning, chunking, the R and .deb readers and the --from-dir build, offline,
with a small byte-level BPE tokenizer trained on the bundled held-out sample."""

import importlib.util
import io
import json
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest

from dsa.data import PackedSFT
from dsa.evaluation import held_out_data
from dsa.presets import SAMPLES_DIR
from dsa.tiny import build_tokenizer

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "make_longtext_eval.py"
spec = importlib.util.spec_from_file_location("make_longtext_eval", SCRIPT)
mle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mle)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer([SAMPLES_DIR / "sft_heldout.jsonl"], vocab_size=400).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return mle.load_tokenizer(str(tokenizer_dir))


# ---------------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------------

GUTENBERG = """The Project Gutenberg EBook of Emma, by Jane Austen

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK EMMA ***

EMMA

Emma Woodhouse, handsome, clever,
and rich, with a comfortable home.

*** END OF THIS PROJECT GUTENBERG EBOOK EMMA ***

Updated editions will replace the previous one.
"""


def test_strip_gutenberg_keeps_only_the_text_between_the_markers():
    assert mle.clean(GUTENBERG, "en") == ["EMMA", "Emma Woodhouse, handsome, clever, and rich, with a comfortable home."]
    # an editor's closing note is cut like Gutenberg's trailer; without markers the whole text stays
    assert mle.strip_gutenberg("Body text.\n\nA NOTE ON THE TEXT\n\nWritten in 1798.\n") == "Body text.\n"
    assert mle.strip_gutenberg("No markers here.\n") == "No markers here.\n"


def test_english_paragraphs_are_unwrapped_and_editorial_notes_dropped():
    text = (
        "It is a truth   universally\r\nacknowledged, that a _single_ man\r\n   in possession of a fortune.\r\n\r\n"
        "[At this point in the first and second editions, Volume 1 ends.]\r\n\r\n\r\n"
        "Short line.\nAnother [aside] line.\n"
    )
    assert mle.clean(text, "en") == [
        "It is a truth universally acknowledged, that a single man in possession of a fortune.",
        "Short line. Another [aside] line.",
    ]


def test_chinese_commentary_notes_and_html_are_removed():
    text = (
        "第一回　甄士隐梦幻识通灵\r\n\r\n"
        "甲戌本凡例\r\n\r\n【此书开卷第一回也。【夹：嵌套】作者自云。】\r\n\r\n"
        "　　列位看官：你道此书从何而来？【甲戌侧批：开卷一笔。】说起根由虽近荒唐。\r\n\r\n"
        "袭人等上来搊（校者注：蒙古王府本此处作“搂”）扶，一壁胡思乱想，庚辰双行夹批：又下此四字。来至房中。\r\n\r\n"
        "香菱便走了。不在话下。笏叟。】\r\n\r\n"
        "按：庚辰本无此回，照蒙本在此分作两回。\r\n\r\n"
        "庚辰本此回无题。\r\n\r\n"
        "甚至?font color=\"#ff0000\">或如翠带飘摇?/font>，或如金绳盘屈。\r\n"
    )
    assert mle.clean(text, "zh") == [
        "第一回　甄士隐梦幻识通灵",
        "列位看官：你道此书从何而来？说起根由虽近荒唐。",
        "袭人等上来搊扶，一壁胡思乱想，来至房中。",
        "香菱便走了。不在话下。",
        "甚至或如翠带飘摇，或如金绳盘屈。",
    ]


def test_chinese_clause_with_foreign_characters_is_dropped_and_spaces_removed():
    text = "宝玉道：“好妹妹。”衣 垢o窣，渐入 堂屋，往那边去了。\n"
    assert mle.clean(text, "zh") == ["宝玉道：“好妹妹。”渐入堂屋，往那边去了。"]


CLEAN_ZH = (
    "宝玉听说，便回道：“此处并没有什么兰麝明月之类，若要这样着迹说来，就题二百联也不能完。”"
    "贾政道：“谁按着你的头，叫你必定说这些字样呢？”宝玉道：“如此说，匾上则莫若蘅芷清芬四字。”"
    "袭人悄悄的笑道：“咱们悄悄的进去。”\n\n"
)


def test_realign_gbk_repairs_a_byte_shift_and_leaves_clean_text_alone():
    sentence = "贾政道：“谁按着你的头，叫你必定说这些字样呢？”"
    # the GBK bytes read from the second byte on, pair by pair, as the damaged source was read
    shifted = sentence.encode("gbk")[1:].decode("gb18030", errors="replace").replace("\ufffd", "")
    assert "按着你的头" not in shifted  # really garbled
    text = CLEAN_ZH * 4 + "他又说 " + shifted + " 众人都笑了。\n"
    repaired = mle.realign_gbk(text)
    assert repaired.startswith(CLEAN_ZH * 4)
    assert sentence[1:] in repaired  # all but the character whose first byte was lost
    assert mle.realign_gbk(CLEAN_ZH * 4) == CLEAN_ZH * 4
    # a short run between two spaces (悄悄的 read one byte late: 那牡) may drop its end bytes cheaply
    garbled = "悄悄的".encode("gbk")[1:].decode("gb18030", errors="replace").replace("\ufffd", "")
    assert garbled == "那牡"
    assert "咱们 悄 进去" in mle.realign_gbk(CLEAN_ZH * 4 + "咱们 那牡 进去。\n")
    assert "咱们那牡进去" in mle.realign_gbk(CLEAN_ZH * 4 + "咱们那牡进去。\n")  # not without the spaces


# ---------------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------------

PARAS = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {'again ' * (i % 5)}today." for i in range(40)]


def test_chunk_documents_reach_min_tokens_and_lose_no_paragraph(tokenizer):
    docs = mle.chunk(PARAS, tokenizer, 60)
    assert len(docs) > 3
    for text, n in docs:
        assert n == mle.count_tokens(tokenizer, text) >= 60
    assert [p for text, _ in docs for p in text.split("\n\n")] == PARAS
    # a cut comes as soon as a document is long enough, so no document but the last is much longer
    longest = max(mle.count_tokens(tokenizer, p) for p in PARAS)
    assert all(n <= 60 + longest + 2 for _, n in docs[:-1])


def test_chunk_short_tail_joins_the_previous_document(tokenizer):
    total = mle.count_tokens(tokenizer, "\n\n".join(PARAS))
    docs = mle.chunk(PARAS, tokenizer, total * 2 // 3)  # one document fits, the rest is too short for another
    assert len(docs) == 1 and docs[0][0] == "\n\n".join(PARAS) and docs[0][1] == total
    assert mle.chunk(PARAS, tokenizer, total + 1) == []
    assert mle.chunk([], tokenizer, 10) == []


# ---------------------------------------------------------------------------------------------------
# R serialization, lazy-load database, .deb
# ---------------------------------------------------------------------------------------------------


def r_character_vector(strings, version=3) -> bytes:
    """An R XDR serialization of a character vector, as serialize(x, NULL, xdr = TRUE) writes it."""
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500 if version == 3 else 0x020300)
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(strings))
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 9, -1)
        else:
            data = s.encode("utf-8")
            out += struct.pack(">ii", 0x00008009, len(data)) + data  # CHARSXP, UTF-8 flag
    return out


def test_r_strings_reads_character_vectors_of_both_formats():
    strings = ["EMMA", "", None, "£5 a year, café"]
    assert mle.r_strings(r_character_vector(strings)) == strings
    assert mle.r_strings(r_character_vector(strings, version=2)) == strings
    with pytest.raises(ValueError, match="type 13"):
        mle.r_strings(b"X\n" + struct.pack(">iii", 2, 0, 0) + struct.pack(">ii", 13, 1) + struct.pack(">i", 7))
    with pytest.raises(ValueError, match="not an XDR"):
        mle.r_strings(b"A\n")


def rdb(*vectors) -> bytes:
    out = b""
    for strings in vectors:
        payload = r_character_vector(strings)
        out += struct.pack(">I", len(payload)) + zlib.compress(payload)
    return out


def test_rdb_objects_decompresses_every_object_in_order():
    assert mle.rdb_objects(rdb(["Persuasion", "", "Chapter 1"], ["EMMA", "By Jane Austen"])) == [
        ["Persuasion", "", "Chapter 1"],
        ["EMMA", "By Jane Austen"],
    ]
    payload = r_character_vector(["x"])
    with pytest.raises(ValueError, match="truncated"):
        mle.rdb_objects(struct.pack(">I", len(payload) + 1) + zlib.compress(payload))


def fake_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A .deb (ar archive) whose data.tar.xz holds `files`."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = b"!<arch>\n"
    for name, data in (("debian-binary", b"2.0\n"), ("data.tar.xz", tar_bytes.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + b"\n" * (len(data) % 2)
    path.write_bytes(out)
    return path


def test_extract_austen_matches_novels_by_their_first_line(tmp_path):
    source = mle.SOURCES[0]
    novels = [["", book.member, "", f"Text of {book.title}."] for book in source.books]
    deb = fake_deb(tmp_path / "p.deb", {mle.RDB: rdb(*reversed(novels))})
    texts = mle.extract_austen(deb, source)
    assert texts["austen-emma"] == "\nEMMA\n\nText of Emma.\n"
    assert len(texts) == len(source.books)
    deb = fake_deb(tmp_path / "q.deb", {mle.RDB: rdb(*novels[1:])})
    with pytest.raises(mle.UsageError, match="no novel titled Sense and Sensibility"):
        mle.extract_austen(deb, source)


def test_fetch_uses_a_verified_file_and_reports_download_errors(tmp_path, monkeypatch):
    archive = tmp_path / "pkg_1.0_all.deb"
    archive.write_bytes(b"package bytes")
    good = mle.Source("apt", "pkg", "1.0", archive.name, mle.sha256_of(archive), "MIT", ())

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although the archive was there")

    monkeypatch.setattr(mle.subprocess, "run", no_download)
    assert mle.fetch(good, tmp_path) == archive
    bad = mle.Source("apt", "pkg", "1.0", archive.name, "0" * 64, "MIT", ())
    with pytest.raises(mle.UsageError, match=f"sha256 mismatch for {archive}: expected 0{{64}}, got {good.sha256}"):
        mle.fetch(bad, tmp_path)

    def apt_fails(command, **kwargs):
        assert command == ["apt-get", "download", "other=2.0"] and kwargs["cwd"] == tmp_path / "dl"
        return subprocess.CompletedProcess(command, 100, "", "W: a warning\nE: Unable to locate package other\n")

    monkeypatch.setattr(mle.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(mle.subprocess, "run", apt_fails)
    missing = mle.Source("apt", "other", "2.0", "other_2.0_all.deb", "0" * 64, "MIT", ())
    with pytest.raises(mle.UsageError) as error:
        mle.fetch(missing, tmp_path / "dl")
    assert str(error.value) == (
        "cannot download other=2.0 with apt-get download: E: Unable to locate package other"
        " (if the package lists are missing or stale, run `apt-get update` first)"
    )


# ---------------------------------------------------------------------------------------------------
# The --from-dir build
# ---------------------------------------------------------------------------------------------------

EN_BOOK = "*** START OF THIS PROJECT GUTENBERG EBOOK EMMA ***\n\n" + "".join(
    f"Chapter {i}. Emma walked to Highbury and spoke\nwith Miss Bates about the weather.\n\n" for i in range(30)
) + "*** END OF THIS PROJECT GUTENBERG EBOOK EMMA ***\nLicence text.\n"
ZH_BOOK = "".join(f"第{'一二三四五六七八九十'[i % 10]}回　宝玉黛玉\n\n宝玉笑道：“妹妹好。”【甲戌侧批：妙。】黛玉笑了。\n\n" for i in range(30))


@pytest.fixture
def books_dir(tmp_path):
    path = tmp_path / "books"
    path.mkdir()
    (path / "austen-emma.txt").write_text(EN_BOOK, encoding="utf-8")
    (path / "hongloumeng-zhiyanzhai.txt").write_text(ZH_BOOK, encoding="utf-8")
    (path / "short.txt").write_text("Too short.\n", encoding="utf-8")
    return path


def test_from_dir_build_writes_records_compare_reads(books_dir, tokenizer_dir, tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    mle.main(["--from-dir", str(books_dir), "--tokenizer", str(tokenizer_dir), "--min-tokens", "80", "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert "note: short.txt is shorter than 80 tokens, left out" in printed
    assert sorted(p.name for p in out.iterdir()) == ["longtext.jsonl", "longtext_en.jsonl", "longtext_zh.jsonl", "manifest.json"]

    records = {name: [json.loads(line) for line in open(out / name, encoding="utf-8")] for name in ("longtext.jsonl", "longtext_en.jsonl", "longtext_zh.jsonl")}
    en, zh, mixed = records["longtext_en.jsonl"], records["longtext_zh.jsonl"], records["longtext.jsonl"]
    assert len(en) > 1 and len(zh) > 1 and len(mixed) == len(en) + len(zh)
    assert [r["language"] for r in mixed[: 2 * min(len(en), len(zh))]] == ["en", "zh"] * min(len(en), len(zh))
    assert en[0]["input"] == f"Emma, by Jane Austen (1815). Part 1 of {len(en)}."
    assert zh[0]["input"] == f"曹雪芹《红楼梦》（脂砚斋重批本），第1部分，共{len(zh)}部分。"
    for r in en + zh:
        assert r["tokens"] == mle.count_tokens(tokenizer, r["output"]) >= 80
        assert "GUTENBERG" not in r["output"] and "Licence" not in r["output"] and "批" not in r["output"]
    assert "\n\n".join(r["output"] for r in en) == "\n\n".join(mle.clean(EN_BOOK, "en"))

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["languages"] == {
        "en": {"documents": len(en), "tokens": sum(r["tokens"] for r in en)},
        "zh": {"documents": len(zh), "tokens": sum(r["tokens"] for r in zh)},
    }
    assert [b["file"] for b in manifest["books"]] == ["austen-emma.txt", "hongloumeng-zhiyanzhai.txt"]

    # compare.py's reader: every line a valid conversation, Chinese and English prompts both found
    path = out / "longtext.jsonl"
    tokens, prompts, skipped = held_out_data([path], tokenizer, n_tokens=10**9, prompts_per_language=1)
    assert skipped == 0 and len(tokens) > sum(r["tokens"] for r in mixed)
    assert [p[-1]["content"] for p in prompts] == [zh[0]["output"], en[0]["output"]]
    assert sum(1 for _ in PackedSFT([path], tokenizer, seq_len=1).conversations()) == len(mixed)

    # the same input gives the same files
    again = tmp_path / "again"
    mle.main(["--from-dir", str(books_dir), "--tokenizer", str(tokenizer_dir), "--min-tokens", "80", "--out-dir", str(again)])
    for name in ("longtext.jsonl", "manifest.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes()


# ---------------------------------------------------------------------------------------------------
# Bad input: one line naming the bad value, exit status 2
# ---------------------------------------------------------------------------------------------------


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        mle.main(list(argv))
    err = capsys.readouterr().err
    return exit_info.value.code, err


@pytest.mark.parametrize("case", ["missing", "empty", "min_tokens", "no_tokenizer_dir", "not_a_tokenizer", "too_short"])
def test_bad_input_gives_one_line_and_exit_status_2(case, books_dir, tokenizer_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "missing": (["--from-dir", str(tmp_path / "nope")], str(tmp_path / "nope")),
        "empty": (["--from-dir", str(empty)], f"no .txt file in {empty}"),
        "min_tokens": (["--from-dir", str(books_dir), "--min-tokens", "0"], "got 0"),
        "no_tokenizer_dir": (["--from-dir", str(books_dir), "--tokenizer", str(tmp_path / "tok")], str(tmp_path / "tok")),
        "not_a_tokenizer": (["--from-dir", str(books_dir), "--tokenizer", str(empty)], f"cannot load a tokenizer from {empty}"),
        "too_short": (["--from-dir", str(books_dir), "--min-tokens", "1000000"], "1000000 tokens"),
    }
    argv, named = args[case]
    if "--tokenizer" not in argv:
        argv += ["--tokenizer", str(tokenizer_dir)]
    code, err = run_main(capsys, *argv, "--out-dir", str(tmp_path / "out"))
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "out" / "longtext.jsonl").exists()


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--from-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr == f"error: books directory not found: {tmp_path / 'nope'}\n"
