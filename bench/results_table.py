"""The docs' results tables, made from the committed files in bench/results/: gate throughput (in
docs/performance.md), and serving (bench/serve_throughput.py, in docs/serving.md).

    python -m bench.results_table           # print the tables
    python -m bench.results_table --write   # put them into their pages between their markers
"""
import argparse
import json
from pathlib import Path

from abcgpt.core.tables import markdown_table, with_table
from bench.gate_throughput import ratio_rows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def rows_of(path):
    record = json.loads(path.read_text())
    for shape, mode, compiled, case, on, middle, ratios in ratio_rows(record["results"]):
        yield [record["device"], record["date"], f"{shape} (batch {middle['batch_size']})", mode,
               "yes" if compiled else "no", f"{case} (CUDA alpha)" if on == "cuda" else case,
               f"{middle['tokens_per_s']:,.0f}", ratios, path.relative_to(RESULTS)]


def gate_table():
    files = sorted(RESULTS.glob("gate_throughput-*.json")) + sorted(RESULTS.glob("*/gate_throughput.json"))
    return markdown_table(["device", "date", "shape", "mode", "compiled", "case", "tokens/s (alpha 0.5)",
                           "x vanilla at alpha 0 / 0.5 / 1 / per-sequence", "file"],
                          [row for path in files for row in rows_of(path)], numeric=[6])


def serve_row(path):
    record = json.loads(path.read_text())
    m, most, info = record["model"], record["throughput"][-1], record["info"]
    flood, starved = record["flood"], record["starvation"]
    tokens_per_s = most["tokens_per_s"]
    ranges = lambda name: f"{tokens_per_s[name]['min']:,.0f}-{tokens_per_s[name]['max']:,.0f}"
    return [record["device"], record["date"], f"{m['n_layer']}x{m['n_embd']}, block {m['block_size']}",
            f"{most['requests']} x {most['new_tokens']}",
            f"{most['ratios']['http_vs_decoder']:.2f}", f"{most['ratios']['http_vs_generate']:.2f}",
            f"{most['ratios']['http_vs_http_one_at_a_time']:.2f}",
            f"{tokens_per_s['http']['median']:,.0f} ({ranges('http')})",
            f"{tokens_per_s['generate']['median']:,.0f} ({ranges('generate')})",
            f"{info['p95_ms']:.0f} ms ({info['streams']} streams)", f"{flood['ratio']:.2f}",
            f"{starved['status']}, {starved['tokens']} tokens in {starved['seconds']:.1f} s",
            path.relative_to(RESULTS)]


def serve_table():
    files = [p for p in sorted(RESULTS.glob("serve-*.json")) if "throughput" in json.loads(p.read_text())]
    return markdown_table(["device", "date", "model", "requests x tokens", "HTTP x in-process decoder",
                           "HTTP x generate() one at a time", "HTTP x HTTP one at a time",
                           "HTTP tokens/s: median (range of 5)", "generate() tokens/s", "/api/info p95",
                           "honest request beside a flood x alone", "long request beside 150 looping clients",
                           "file"], [serve_row(path) for path in files])


# marker: (the page that holds the table, the table)
TABLES = {"results": (ROOT / "docs" / "performance.md", gate_table),
          "serve-results": (ROOT / "docs" / "serving.md", serve_table)}


def current(marker):
    """(page, its text, its text with the table of marker made afresh)."""
    page, table = TABLES[marker]
    text = page.read_text()
    return page, text, with_table(text, marker, table())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="update the tables in their pages")
    args = p.parse_args()
    if args.write:
        for marker in TABLES:
            page, _, fresh = current(marker)
            page.write_text(fresh)
            print(f"updated {page}")
    else:
        print(gate_table(), serve_table(), sep="\n\n")


if __name__ == "__main__":
    main()
