"""The README's results table, made from the committed files in bench/results/.

    python -m bench.results_table           # print the table
    python -m bench.results_table --write   # put it into README.md between its markers
"""
import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def rows_of(path):
    record = json.loads(path.read_text())
    cases = {}
    for r in record["results"]:
        key = (r["shape"], r["mode"], r["compiled"], r["case"], r.get("alpha_device"))
        cases.setdefault(key, {})[r["alpha"]] = r
    name = path.relative_to(RESULTS)
    for (shape, mode, compiled, case, on), by_alpha in cases.items():
        middle = by_alpha.get(0.5) or by_alpha.get(None) or next(iter(by_alpha.values()))
        ratios = " / ".join(
            f"{by_alpha[a]['ratio_to_vanilla']:.2f}" if a in by_alpha and by_alpha[a]["ratio_to_vanilla"] else "-"
            for a in (0.0, 0.5, 1.0, "seq")
        ) if case != "vanilla" else "1"
        label = f"{case} (CUDA alpha)" if on == "cuda" else case
        yield (f"| {record['device']} | {record['date']} | {shape} (batch {middle['batch_size']}) | {mode} | "
               f"{'yes' if compiled else 'no'} | {label} | {middle['tokens_per_s']:,.0f} | {ratios} | {name} |")


def table():
    files = sorted(RESULTS.glob("gate_throughput-*.json")) + sorted(RESULTS.glob("*/gate_throughput.json"))
    lines = [
        "| device | date | shape | mode | compiled | case | tokens/s (alpha 0.5) "
        "| x vanilla at alpha 0 / 0.5 / 1 / per-sequence | file |",
        "| --- | --- | --- | --- | --- | --- | ---: | --- | --- |",
    ]
    for path in files:
        lines.extend(rows_of(path))
    return "\n".join(lines)


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
