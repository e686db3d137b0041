"""The house: stages depend only downwards (shared <- stage1_extract <- stage2_train <- stage3_index <- termret),
including imports inside functions."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"shared": 0, "stage1_extract": 1, "stage2_train": 2, "stage3_index": 3, "bench": 4, "termret": 5}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in a file that names one of the project's packages."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(node.lineno, n.split(".")[0]) for n in names
                if n.split(".")[0] in LEVEL or n.split(".")[0] in ("tests", "demo")]
    return out


# the demo's data (package demo/) may use shared/ and stage 1 (prepare's term finder); only the
# program that lists every command (termret) may import it: no stage ever depends on demo data code
DEMO_MAY_IMPORT = {"shared", "stage1_extract", "demo"}
# bench/ measures every stage, so it sits above them all, beside termret


def upward_imports() -> list[str]:
    bad = []
    for pkg, level in {**LEVEL, "demo": None}.items():
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for line, target in imported_packages(path):
                if pkg == "demo":
                    wrong = target not in DEMO_MAY_IMPORT
                else:
                    wrong = target == "tests" or (target == "demo" and pkg != "termret") or \
                        (target != "demo" and LEVEL[target] > level)
                if wrong:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return bad


def test_no_stage_imports_a_higher_one():
    assert upward_imports() == []


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from stage3_index.metrics import auroc\n    import stage2_train.data\n")
    assert imported_packages(f) == [(4, "stage3_index"), (5, "stage2_train")]
