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


def write_windows(directory: Path, gaps: dict[str, list[float]]) -> Path:
    """compare.py's results at 4096 with per-window perplexities: dense 10, 20, 40; DSA dense * (1 + gap_i)."""
    directory.mkdir(parents=True)
    dense = [10.0, 20.0, 40.0][:len(next(iter(gaps.values())))]
    mean = {k: sum(g) / len(g) for k, g in gaps.items()}
    results = {"perplexity": {
        "lengths": [4096],
        "dsa_vs_dense": {k: [figure(mean[k], mean[k] - 0.01, mean[k] + 0.01, 3)] for k in gaps},
        "per_window": {"dense": [dense], "dsa": {k: [[d * (1 + x) for d, x in zip(dense, g)]] for k, g in gaps.items()}},
    }}
    (directory / "results.json").write_text(json.dumps(results))
    return directory


def test_extrapolation_pairs_the_last_two_points_per_window(tmp_path, capsys):
    a = write_windows(tmp_path / "a", {"128": [0.24, 0.25, 0.26], "256": [0.10, 0.12, 0.11]})
    b = write_windows(tmp_path / "b", {"128": [0.05, 0.04, 0.06], "256": [0.11, 0.11, 0.11]})
    c = write_windows(tmp_path / "c", {"128": [0.5, 0.5, 0.5], "256": [0.02, 0.02, 0.02]})
    gap_curve.main(["--point", f"r:1000:{a}", "--point", f"r:3000:{b}", "--point", f"one:5:{c}",
                    "--length", "4096", "--png", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[1]: line for line in out.splitlines() if line.startswith("| r | ") and "->" in line}
    # k = 128: changes -0.19, -0.21, -0.20: mean -0.2, sd 0.01, t_2 = 4.303 -> [-0.2248, -0.1752];
    # +3% at 3000 + (0.05 - 0.03) * 2000 / 0.2 = 3200, and at 3000 + 40 / 0.2248 = 3178, 3000 + 40 / 0.1752 = 3228
    assert rows["128"] == "| r | 128 | 1,000 -> 3,000 | -20.0 points [-22.5, -17.5]* | 3,200 [3,178, 3,228] |"
    # k = 256: changes +0.01, -0.01, 0.00: the interval holds 0
    assert rows["256"] == ("| r | 256 | 1,000 -> 3,000 | +0.0 points [-2.5, +2.5] "
                           "| no measurable change: plateau, no extrapolation |")
    assert "| one |" not in out.split("tokens A -> B")[1]  # one point: nothing to extrapolate

    worse = write_windows(tmp_path / "worse", {"128": [0.30, 0.31, 0.32], "256": [0.11, 0.11, 0.11]})
    gap_curve.main(["--point", f"r:1000:{a}", "--point", f"r:3000:{worse}", "--length", "4096", "--png", str(tmp_path / "p.png")])
    # k = 128: changes +0.06 each: the gap rises measurably, which is neither a plateau nor a rate towards +3%
    assert "| r | 128 | 1,000 -> 3,000 | +6.0 points [+6.0, +6.0]* | the gap grows: no extrapolation |" in capsys.readouterr().out

    gap_curve.main(["--point", f"r:1000:{a}", "--point", f"r:3000:{b}", "--target", "0.06", "--length", "4096",
                    "--png", str(tmp_path / "p.png")])
    assert "| r | 128 | 1,000 -> 3,000 | -20.0 points [-22.5, -17.5]* | the gap's mean is already <= +6% |" in capsys.readouterr().out


def test_dense_from_pairs_every_point_with_the_original_dense_windows(tmp_path, capsys):
    """A point whose own dense mode drifted: --dense-from measures its DSA against the original dense windows."""
    start = write_windows(tmp_path / "start", {"128": [0.1, 0.1, 0.1]})  # dense 10, 20, 40
    drifted = tmp_path / "drifted"
    write_windows(drifted, {"128": [0.0, 0.0, 0.0]})
    results = json.loads((drifted / "results.json").read_text())
    results["perplexity"]["per_window"]["dense"] = [[11.0, 22.0, 44.0]]  # DSA = its own dense = 1.1 x the original
    results["perplexity"]["per_window"]["dsa"]["128"] = [[11.0, 22.0, 44.0]]
    (drifted / "results.json").write_text(json.dumps(results))
    args = ["--point", f"r:1:{start}", "--point", f"r:2:{drifted}", "--length", "4096", "--png", str(tmp_path / "p.png")]
    gap_curve.main(args)
    assert "| r | 2 | 128 | 32 | +0.0% [-1.0, +1.0] |" in capsys.readouterr().out  # against its own dense mode
    gap_curve.main(args + ["--dense-from", str(start)])
    out = capsys.readouterr().out
    assert "| r | 2 | 128 | 32 | +10.0% [+10.0, +10.0]* |" in out  # against the original dense windows
    assert "| r | 128 | 1 -> 2 | +0.0 points [+0.0, +0.0] |" in out

    short = write_windows(tmp_path / "short", {"128": [0.1]})
    with pytest.raises(SystemExit) as e:
        gap_curve.main(args + ["--dense-from", str(short)])
    assert "3 windows, --dense-from has 1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        gap_curve.main(args + ["--dense-from", str(tmp_path / "missing")])
    assert "--dense-from" in str(e.value) and "missing" in str(e.value) and "\n" not in str(e.value)
