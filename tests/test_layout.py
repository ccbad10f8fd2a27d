"""The project's layout: imports run one way (no cycle; nothing imports the experiment, and only it the
algorithms; the bottom files, model.py, data/corpus.py and errors.py, nothing above them, and hf.py only
model.py and errors.py; kernels/ nothing of the project outside it; no project import hidden inside a
function), every file under 350 lines, and the
algorithms' loops in plain sight (backward and the optimizer step in dpo.run and ppo.run, no lambda or nested
function in dpo.py, ppo.py, stages.py or sampling.py). And the tests name their device: none leans on a default that
changes with CUDA.

    python -m pytest tests/test_layout.py     (CPU; under a second)
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = "experiment"  # every stage and run; `python dpo.py` starts it, from dpo.py's __main__ block alone
ALGORITHMS = {"dpo", "ppo"}  # imported by the driver alone
# and what each may import: hf.py, GPT-2's weights in and out of Hugging Face's format, sits on model.py
BOTTOM = {"errors": set(), "model": {"errors"}, "data.corpus": {"errors"}, "hf": {"errors", "model"}}
ENTRY_POINTS = {"kernels.bench", "bench_step", "kernels.compile_check", "results.truncation"}  # scripts nothing imports
MOST_LINES = 350


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


def is_main_block(node):
    """if __name__ == "__main__": the file run as a script, not imported."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and getattr(test.left, "id", "") == "__name__"
            and any(getattr(c, "value", None) == "__main__" for c in test.comparators))


def imports(path, mods, module):
    """(imported project module, line, where) for every import in the file; where is "function" (inside one),
    "script" (under if __name__ == "__main__") or "module"."""
    found = []

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            inside = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inside = "function"
            elif is_main_block(child) and where == "module":
                inside = "script"
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
    visit(ast.parse(open(path).read()), "module")
    return found


def test_imports_form_no_cycle_and_run_one_way():
    mods = project_modules()
    assert {"dpo", "ppo", "experiment", "common", "record", "sampling", "stages", "model", "hf", "errors",
            "kernels", "kernels.logprobs"} <= set(mods)
    graph, problems = {}, []
    for m, path in mods.items():
        found = imports(path, mods, m)
        graph[m] = {name for name, _, where in found if where != "script"}  # a script's imports run last
        for name, line, where in sorted(set(found)):
            at = f"{os.path.relpath(path, ROOT)}:{line} imports {name}"
            if where == "function":
                problems.append(at + " inside a function")
            if where == "script" and not (m == "dpo" and name == DRIVER):
                problems.append(at + " under __main__ (only dpo.py starts the experiment there)")
            if where != "script" and name == DRIVER and m not in ENTRY_POINTS:
                problems.append(at + ", the driver above every file")
            if name in ALGORITHMS and m != DRIVER and m not in ENTRY_POINTS:
                problems.append(at + ", an algorithm above it (only the driver runs them)")
            if m in BOTTOM and name not in BOTTOM[m]:
                problems.append(at + f", a file above it ({m} may import only {sorted(BOTTOM[m])})")
            if m.split(".")[0] == "kernels" and name.split(".")[0] != "kernels":
                problems.append(at + ", outside kernels/ (the kernel and its benchmarks stand alone)")
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


def test_every_file_is_under_350_lines():
    long = {os.path.relpath(p, ROOT): n for p in project_modules().values()
            if (n := len(open(p).read().splitlines())) > MOST_LINES}
    assert not long, long


def test_the_algorithms_loops_are_in_plain_sight():
    """dpo.run and ppo.run call backward() and the optimizer's step themselves (ppo.run inside its epoch and
    minibatch loops, inside the iteration loop), and dpo.py, ppo.py, stages.py and sampling.py hand no
    lambda or nested
    function around (stages.py's lambdas only write a file, as write_atomic's writer)."""
    for name in ("dpo", "ppo", "stages", "sampling"):
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))):
            nested = [n.name for n in ast.walk(fn) if isinstance(n, ast.FunctionDef) and n is not fn
                      and not isinstance(fn, ast.ClassDef)]
            assert not nested, f"{name}.py: {fn.name} defines {nested}"
        for lam in (n for n in ast.walk(tree) if isinstance(n, ast.Lambda)):
            call = next((c for c in ast.walk(tree) if isinstance(c, ast.Call) and lam in c.args), None)
            assert name == "stages" and getattr(call.func, "id", "") == "write_atomic", f"{name}.py:{lam.lineno}"
        if name in ("stages", "sampling"):
            continue
        run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
        calls = {getattr(c.func, "attr", "") for c in ast.walk(run) if isinstance(c, ast.Call)}
        assert {"backward", "step", "zero_grad", "clip_grad_norm_"} <= calls, name
        if name == "ppo":  # for iteration: rollout; for epoch: for minibatch: loss, backward, step
            loops = [n for n in ast.walk(run) if isinstance(n, ast.For)]
            depth = max(sum(1 for outer in loops if inner in ast.walk(outer)) for inner in loops)
            assert depth == 3


def test_the_layout_test_sees_cycles_and_deferred_imports(tmp_path):
    """The checker itself: a made-up project with a cycle and a function-level import."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    mods = {"a": str(tmp_path / "a.py"), "b": str(tmp_path / "b.py")}
    (tmp_path / "c.py").write_text('if __name__ == "__main__":\n    import a\n')
    mods["c"] = str(tmp_path / "c.py")
    assert imports(mods["a"], mods, "a") == [("b", 1, "module")]
    assert imports(mods["b"], mods, "b") == [("a", 2, "function")]
    assert imports(mods["c"], mods, "c") == [("a", 2, "script")]


def test_tests_name_their_device():
    """--device defaults to cuda where there is one, and the preset to imdb there: every command line a test
    hands to get_args or experiment.main names --device (followed through the helpers and lists of its file).
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
