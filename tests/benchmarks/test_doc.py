"""benchmarks/_doc.py: sections are replaced in place, and each names the machine it ran on."""
from benchmarks import _doc


def test_sections_keep_each_other_and_name_their_machine(tmp_path):
    doc = tmp_path / "benchmarks.md"
    _doc.write_section("first", "## First\n\nold numbers", doc)
    _doc.write_section("second", "## Second\n\n| a |\n|---|", doc)
    _doc.write_section("first", "## First\n\nnew numbers", doc)
    sections = dict(_doc.read_sections(doc.read_text()))
    assert list(sections) == ["header", "first", "second"]
    assert sections["first"] == f"## First\n\n{_doc.machine_line()}\n\nnew numbers"
    assert sections["second"].count(_doc.machine_line()) == 1
    assert "old numbers" not in doc.read_text()
    assert _doc.cpu_model() in sections["header"]
