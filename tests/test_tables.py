"""The one Markdown table formatter (abcgpt/core/tables.py) and a generated table kept inside a page."""
from abcgpt.core.tables import markdown_table, with_table


def test_a_table_has_a_rule_and_right_aligned_numbers():
    table = markdown_table(["name", "loss"], [["a", 1.5], ["b", 2]], numeric=[1])
    assert table.splitlines() == ["| name | loss |", "| --- | ---: |", "| a | 1.5 |", "| b | 2 |"]


def test_a_generated_table_replaces_only_what_is_between_its_markers():
    page = "intro\n<!-- t:start -->\nold\n<!-- t:end -->\nafter\n<!-- u:start -->\nkept\n<!-- u:end -->\n"
    new = with_table(page, "t", "| x |")
    assert new == "intro\n<!-- t:start -->\n| x |\n<!-- t:end -->\nafter\n<!-- u:start -->\nkept\n<!-- u:end -->\n"
    assert with_table(new, "t", "| x |") == new
