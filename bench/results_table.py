"""The README's results table, made from the committed files in bench/results/.

    python -m bench.results_table           # print the table
    python -m bench.results_table --write   # put it into README.md between its markers
"""
import argparse
import json
from pathlib import Path

from bench.gate_throughput import ratio_rows
from bench.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def rows_of(path):
    record = json.loads(path.read_text())
    for shape, mode, compiled, case, on, middle, ratios in ratio_rows(record["results"]):
        yield [record["device"], record["date"], f"{shape} (batch {middle['batch_size']})", mode,
               "yes" if compiled else "no", f"{case} (CUDA alpha)" if on == "cuda" else case,
               f"{middle['tokens_per_s']:,.0f}", ratios, path.relative_to(RESULTS)]


def table():
    files = sorted(RESULTS.glob("gate_throughput-*.json")) + sorted(RESULTS.glob("*/gate_throughput.json"))
    return markdown_table(["device", "date", "shape", "mode", "compiled", "case", "tokens/s (alpha 0.5)",
                           "x vanilla at alpha 0 / 0.5 / 1 / per-sequence", "file"],
                          [row for path in files for row in rows_of(path)], numeric=[6])


def readme_with_table(readme):
    before, _, rest = readme.partition(START)
    _, _, after = rest.partition(END)
    return f"{before}{START}\n{table()}\n{END}{after}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="update README.md in place")
    args = p.parse_args()
    if args.write:
        readme = ROOT / "README.md"
        readme.write_text(readme_with_table(readme.read_text()))
        print(f"updated {readme}")
    else:
        print(table())


if __name__ == "__main__":
    main()
