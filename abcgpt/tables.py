"""The one Markdown table formatter: of the reports, the benchmarks and their summaries."""


def markdown_table(headers, rows, numeric=()):
    """A GitHub Markdown table; the columns whose indices are in numeric are right-aligned."""
    numeric = set(numeric)
    rule = ["---:" if i in numeric else "---" for i in range(len(headers))]
    lines = [headers, rule, *([str(cell) for cell in row] for row in rows)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
