"""The project's imports run one way: no cycle, nothing below the algorithms imports them, kernels/
imports nothing of the project outside it, and no project import is hidden inside a function. And the
tests name their device: none leans on a default that changes with CUDA.

    python -m pytest tests/test_layout.py     (CPU; under a second)
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = {"dpo", "ppo"}  # the algorithms; dpo.py runs PPO's runs too, so it alone may import ppo
ENTRY_POINTS = {"kernels.bench", "bench_step", "kernels.compile_check", "results.truncation"}  # scripts nothing imports


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
        for name, line, inside in sorted(set(found)):
            where = f"{os.path.relpath(path, ROOT)}:{line} imports {name}"
            if inside:
                problems.append(where + " inside a function")
            if name in TOP and not (m == "dpo" and name == "ppo") and m not in ENTRY_POINTS:
                problems.append(where + ", a file above it")
            if m.split(".")[0] == "kernels" and name.split(".")[0] != "kernels":
                problems.append(where + ", outside kernels/ (the kernel and its benchmarks stand alone)")
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


def test_tests_name_their_device():
    """--device defaults to cuda where there is one, and the preset to imdb there: every command line a test
    hands to get_args or dpo.main names --device (followed through the helpers and lists of its file).
    Every test of the fused kernel against the reference builds its model on DEVICE (conftest): on CUDA the
    kernel runs on the GPU, not the interpreter, and takes CUDA tensors only."""
    problems = []
    for f in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if not f.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(ROOT, "tests", f)).read())
        named = {}  # module-level functions and assignments, by name
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                named[node.name] = node
            elif isinstance(node, ast.Assign):
                named.update({t.id: node.value for t in node.targets if isinstance(t, ast.Name)})

        def strings(node, seen):
            found = set()
            for n in ast.walk(node):
                if isinstance(n, ast.Constant) and isinstance(n.value, str):
                    found.add(n.value)
                elif isinstance(n, ast.Name) and n.id in named and n.id not in seen:
                    found |= strings(named[n.id], seen | {n.id})
            return found
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
                name = getattr(call.func, "attr", getattr(call.func, "id", ""))
                where = f"tests/{f}:{call.lineno}"
                if name in ("get_args", "main") and "--device" not in strings(call, set()):
                    problems.append(f"{where}: {name}(...) without --device")
                if name == "assert_fused_matches_reference" and "DEVICE" not in {n.id for n in ast.walk(fn)
                                                                                 if isinstance(n, ast.Name)}:
                    problems.append(f"{where}: {fn.name} compares the fused kernel on a model not put on DEVICE")
    assert not problems, "\n".join(problems)
