"""scripts/gap_curve.py: the gap-vs-tokens table and plot from compare.py results."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import gap_curve  # noqa: E402


def figure(mean, low, high, n=6):
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": n}


def write_results(directory: Path, gap128: float, recall128: float) -> Path:
    directory.mkdir(parents=True)
    results = {
        "perplexity": {
            "lengths": [2048, 4096],
            "dsa_vs_dense": {"256": [figure(0.5, 0.4, 0.6), figure(0.01, -0.01, 0.03)],
                             "128": [figure(0.9, 0.8, 1.0), figure(gap128, gap128 - 0.01, gap128 + 0.01)]},
        },
        "recall": {"length": 4096, "mean": {"128": {"indexer": figure(recall128, recall128 - 0.1, recall128 + 0.1, 24)},
                                            "256": {"indexer": figure(0.9, 0.85, 0.95, 24)}}},
    }
    (directory / "results.json").write_text(json.dumps(results))
    return directory


def test_table_rows_follow_the_points_and_mark_significant_gaps(tmp_path, capsys):
    a = write_results(tmp_path / "a", 0.25, 0.6)
    b = write_results(tmp_path / "b", 0.05, 0.8)
    png = tmp_path / "curve.png"
    gap_curve.main(["--point", f"short:1000:{a}", "--point", f"short:3000:{b}", "--length", "4096", "--png", str(png)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| short | 1,000 | 128 | 32 | +25.0% [+24.0, +26.0]* | 0.600 [0.500, 0.700] |"
    assert lines[3] == "| short | 1,000 | 256 | 16 | +1.0% [-1.0, +3.0] | 0.900 [0.850, 0.950] |"  # interval holds 0: no star
    assert lines[4].startswith("| short | 3,000 | 128 | 32 | +5.0% [+4.0, +6.0]* | 0.800")
    assert png.stat().st_size > 10_000


def test_bad_points_give_one_line(tmp_path):
    a = write_results(tmp_path / "a", 0.25, 0.6)
    for point, message in [(f"x:10:{tmp_path / 'missing'}", "results.json"), (f"x:ten:{a}", "invalid literal"),
                           (f"x:10:{a}", "no perplexity at length 8192")]:
        with pytest.raises(SystemExit) as e:
            gap_curve.main(["--point", point, "--length", "8192" if "8192" in message else "4096", "--png", str(tmp_path / "p.png")])
        assert message in str(e.value) and point in str(e.value) and "\n" not in str(e.value)
