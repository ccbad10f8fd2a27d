"""The project's imports run one way: no cycle, nothing below the algorithms imports them, and no
project import is hidden inside a function.

    python -m pytest tests/test_layout.py     (CPU; under a second)
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = {"dpo", "ppo"}  # the algorithms; dpo.py runs PPO's runs too, so it alone may import ppo
ENTRY_POINTS = {"kernels.bench", "kernels.bench_step", "kernels.compile_check"}  # scripts nothing imports


def project_modules():
    """{'data.corpus': path, ...} for every .py file of the project outside tests/."""
    mods = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "out", "__pycache__")]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                mods[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return mods


def imports(path, mods, module):
    """(imported project module, line, inside a function?) for every import in the file."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from .reference import ...
                    package = module.split(".")[: len(module.split(".")) - child.level + (module in packages)]
                    base = ".".join(package + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in child.names]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    found.append((name, child.lineno, inside))
            visit(child, inside)
    packages = {m for m, p in mods.items() if p.endswith("__init__.py")}
    visit(ast.parse(open(path).read()), False)
    return found


def test_imports_form_no_cycle_and_run_one_way():
    mods = project_modules()
    assert {"dpo", "ppo", "common", "stages", "model", "kernels", "kernels.logprobs"} <= set(mods)
    graph, problems = {}, []
    for m, path in mods.items():
        found = imports(path, mods, m)
        graph[m] = {name for name, _, _ in found}
        for name, line, inside in found:
            where = f"{os.path.relpath(path, ROOT)}:{line} imports {name}"
            if inside:
                problems.append(where + " inside a function")
            if name in TOP and not (m == "dpo" and name == "ppo") and m not in ENTRY_POINTS:
                problems.append(where + ", a file above it")
    assert not problems, "\n".join(problems)
    state = {}  # depth-first search: 1 = on the current path, 2 = done

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_layout_test_sees_cycles_and_deferred_imports(tmp_path):
    """The checker itself: a made-up project with a cycle and a function-level import."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    mods = {"a": str(tmp_path / "a.py"), "b": str(tmp_path / "b.py")}
    assert imports(mods["a"], mods, "a") == [("b", 1, False)]
    assert imports(mods["b"], mods, "b") == [("a", 2, True)]
