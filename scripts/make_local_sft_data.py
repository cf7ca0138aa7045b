"""Build deepctrl-sft-data-format JSONL (docs/method.md, data formats) from real text found on an offline machine.

For runs on real weights where no hub is reachable. Four kinds of records, all real text, none generated:
  code         (en) a Python source file of the interpreter's standard library: the input is its first
               lines, the output the rest (files longer than --chunk-chars are cut at top-level
               definitions into several records).
  readme       (en) the long description (README) in an installed package's METADATA.
  translation  (zh) gettext catalogs (/usr/share/locale/zh_CN/LC_MESSAGES/*.mo): numbered English interface
               strings as input, their Chinese translations, numbered the same way, as output.
  manual       (zh) Chinese man pages (/usr/share/man/zh_*), rendered to plain text with `man -l`.

Train / held-out split by source (a source goes wholly to one side): a stable hash of its name puts
about 1 in --heldout-every sources in heldout.jsonl. A source is a file, except for the gettext catalogs,
where it is one record's block of strings (a few large catalogs hold most of the Chinese text). Records are shuffled with a fixed seed.

    uv run python scripts/make_local_sft_data.py --out-dir runs/real/data
"""

import argparse
import gettext
import hashlib
import json
import os
import random
import re
import subprocess
import sysconfig
from collections.abc import Iterator
from email.parser import BytesParser
from importlib import metadata
from pathlib import Path

TOP_LEVEL = re.compile(r"^(?:def |class |async def |@)", re.M)  # where a long module may be cut


def record(instruction: str, text: str, output: str, language: str, source: str, kind: str, keywords: list[str]) -> dict:
    return {
        "instruction": instruction,
        "input": text,
        "output": output,
        "history": [],
        "language": language,
        "data_source": source,
        "input_len": len(instruction) + len(text),
        "output_len": len(output),
        "num_utter": 1,
        "type": kind,
        "type_keyword": keywords,
    }


def split_code(text: str, chunk_chars: int) -> list[str]:
    """Cut a module into pieces of at most ~chunk_chars at top-level definitions (a longer definition stays whole)."""
    starts = [0] + [m.start() for m in TOP_LEVEL.finditer(text) if m.start() > 0] + [len(text)]
    pieces, begin = [], 0
    for prev, end in zip(starts, starts[1:]):
        if end - begin > chunk_chars and prev > begin:
            pieces.append(text[begin:prev])
            begin = prev
    pieces.append(text[begin:])
    return [p for p in pieces if p.strip()]


def code_records(chunk_chars: int, head_lines: int) -> Iterator[tuple[str, dict]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in ("test", "site-packages", "idlelib", "lib2to3") or "tests" in rel.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for i, piece in enumerate(split_code(text, chunk_chars)):
            lines = piece.splitlines(keepends=True)
            if len(lines) <= 2 * head_lines:
                continue
            head, rest = "".join(lines[:head_lines]), "".join(lines[head_lines:])
            part = f" (part {i + 1})" if i else ""
            instruction = f"Continue this Python source file, Lib/{rel}{part}."
            yield str(path), record(instruction, head, rest, "en", "python-stdlib", "code", ["python", "code completion"])


def readme_records(min_chars: int) -> Iterator[tuple[str, dict]]:
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"].lower()):
        raw = dist.read_text("METADATA")
        if not raw:
            continue
        msg = BytesParser().parsebytes(raw.encode("utf-8", "replace"))
        body = msg.get_payload() or msg.get("Description") or ""
        if not isinstance(body, str) or len(body) < min_chars:
            continue
        name, summary = msg["Name"], msg.get("Summary") or ""
        instruction = f"Write the README of the Python package {name}."
        yield f"dist:{name}", record(instruction, summary, body.strip(), "en", "pypi-metadata", "readme", ["documentation"])


def translation_records(entries_per_record: int) -> Iterator[tuple[str, dict]]:
    for path in sorted(Path("/usr/share/locale/zh_CN/LC_MESSAGES").glob("*.mo")):
        try:
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
        except OSError:  # not a valid catalog
            continue
        pairs = [
            (src.strip(), dst.strip())
            for src, dst in catalog.items()
            if isinstance(src, str) and src.strip() and isinstance(dst, str) and dst.strip() and src != dst
        ]
        for start in range(0, len(pairs), entries_per_record):
            batch = pairs[start : start + entries_per_record]
            text = "\n".join(f"{i + 1}. {src}" for i, (src, _) in enumerate(batch))
            output = "\n".join(f"{i + 1}. {dst}" for i, (_, dst) in enumerate(batch))
            instruction = f"把下面这些软件（{path.stem}）界面字符串翻译成简体中文，保持编号一一对应。"
            yield f"{path}#{start}", record(instruction, text, output, "zh", "gettext-zh", "translation", ["翻译", "软件本地化"])


def manual_records() -> Iterator[tuple[str, dict]]:
    env = dict(os.environ, MANWIDTH="80", LANG="C.UTF-8")
    for path in sorted(Path("/usr/share/man").glob("zh_*/man*/*")):
        rendered = subprocess.run(["man", "-l", str(path)], capture_output=True, env=env, text=True).stdout
        text = re.sub(r".\x08", "", rendered).strip()  # drop overstrike (bold/underline) sequences
        if len(text) < 200:
            continue
        name = path.name.split(".")[0]
        yield str(path), record(f"请给出命令或文件 {name} 的中文手册页。", "", text, "zh", "man-pages-zh", "manual", ["手册", "命令行"])


def is_heldout(source: str, every: int) -> bool:
    return int(hashlib.sha1(source.encode()).hexdigest(), 16) % every == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/real/data")
    parser.add_argument("--code-chars", type=int, default=3_000_000, help="budget of stdlib source characters (train)")
    parser.add_argument("--chunk-chars", type=int, default=8000)
    parser.add_argument("--head-lines", type=int, default=20)
    parser.add_argument("--heldout-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    code = list(code_records(args.chunk_chars, args.head_lines))
    rng.shuffle(code)  # a random subset of the standard library within the budget
    kept, total = [], 0
    for source, rec in code:
        if total < args.code_chars or is_heldout(source, args.heldout_every):
            kept.append((source, rec))
            total += 0 if is_heldout(source, args.heldout_every) else rec["output_len"]
    sources = kept + list(readme_records(1500)) + list(translation_records(40)) + list(manual_records())

    splits = {"train": [], "heldout": []}
    for source, rec in sources:
        splits["heldout" if is_heldout(source, args.heldout_every) else "train"].append(rec)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        rng.shuffle(records)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i, rec in enumerate(records):
                f.write(json.dumps({"id": i, **rec}, ensure_ascii=False) + "\n")
        by_type = {}
        for rec in records:
            n, chars = by_type.get(rec["type"], (0, 0))
            by_type[rec["type"]] = (n + 1, chars + rec["input_len"] + rec["output_len"])
        summary = ", ".join(f"{kind} {n} records / {chars / 1e6:.2f}M chars" for kind, (n, chars) in sorted(by_type.items()))
        print(f"{out / (name + '.jsonl')}: {len(records)} records ({summary})")


if __name__ == "__main__":
    main()
