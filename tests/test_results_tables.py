"""The README's results tables are docs/results/overview.py's output, made from the committed results."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parents[1]


def overview():
    spec = importlib.util.spec_from_file_location("overview", ROOT / "docs" / "results" / "overview.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_tables_are_made_from_the_committed_results():
    readme, module = (ROOT / "README.md").read_text(), overview()
    # regenerate them with: python docs/results/overview.py
    assert module.table() in readme
    assert module.headroom_table() in readme
    assert module.diagnostics_table() in readme


def test_an_interval_is_bold_exactly_when_it_excludes_zero():
    interval = overview().interval
    assert interval([1.2, -3.0, 5.0]) == "+1.2 [-3.0, +5.0]"
    assert interval([7.2, 2.0, 12.0]) == "**+7.2 [+2.0, +12.0]**"
    assert interval([-6.0, -13.0, -1.0]) == "**-6.0 [-13.0, -1.0]**"
