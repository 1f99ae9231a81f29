"""The one Markdown table formatter, of the reports, the benchmarks and their summaries; and the one way a
generated table is kept inside a hand-written page."""


def markdown_table(headers, rows, numeric=()):
    """A GitHub Markdown table; the columns whose indices are in numeric are right-aligned."""
    numeric = set(numeric)
    rule = ["---:" if i in numeric else "---" for i in range(len(headers))]
    lines = [headers, rule, *([str(cell) for cell in row] for row in rows)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def with_table(page, marker, table):
    """The page's text with table between its <!-- marker:start --> and <!-- marker:end --> lines."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    before, _, rest = page.partition(start)
    _, _, after = rest.partition(end)
    return f"{before}{start}\n{table}\n{end}{after}"
