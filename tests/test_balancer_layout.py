"""The balancer package's public names, and what its layout promises."""

from __future__ import annotations

import ast
from pathlib import Path

import lbmqtt.balancer

ROOT = Path(__file__).resolve().parent.parent


def test_the_balancer_package_exports_exactly_its_public_names() -> None:
    assert set(lbmqtt.balancer.__all__) == set(
        """
        CHANGING GC_THRESHOLDS PROBE_PATIENCE_S Balancer JournalEntry JournalStore
        LogJournal MemoryJournal NodeInfo SqliteJournal TaskRecord default_path tune_gc
        """.split()
    )
    for name in lbmqtt.balancer.__all__:
        assert getattr(lbmqtt.balancer, name) is not None


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_only_the_journal_store_on_disk_imports_sqlite3() -> None:
    users = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "lbmqtt").rglob("*.py")
        if any(n.split(".")[0] == "sqlite3" for n in _imports(p))
    )
    assert users == ["lbmqtt/balancer/sqlite.py"]
