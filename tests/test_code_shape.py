"""The code stays readable: no function in trainer/ or ui/ runs over 80 lines (STYLE.md)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def long_functions(folder: str, limit: int = 80) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_over_80_lines():
    assert long_functions("trainer") + long_functions("ui") == []


def test_the_check_finds_a_long_function(tmp_path, monkeypatch):
    import tests.test_code_shape as shape

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n" + "    x = 1\n" * 81)
    monkeypatch.setattr(shape, "ROOT", tmp_path)
    assert shape.long_functions("pkg") == ["pkg/m.py:1 f (82 lines)"]
