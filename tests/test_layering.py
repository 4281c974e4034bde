"""The package's layering is a DAG (../DESIGN.md §3 in spirit, README "Layout"): walk every import
in src/rlhfkit, top-level and inside functions, and fail on an edge that points the wrong way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MATH = {"rlhfkit.losses", "rlhfkit.advantages", "rlhfkit.stats"}
# The seams: only these (and the speed paths themselves) may import rlhfkit.fast.
FAST_USERS = {"rlhfkit.logprobs", "rlhfkit.engines.builtin", "rlhfkit.train.loop"}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every rlhfkit module ``path`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rlhfkit")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhfkit"):
            found.add(node.module)
            # `from rlhfkit.train import rm` imports the module rlhfkit.train.rm
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if (SRC / node.module.replace(".", "/") / f"{a.name}.py").exists()}
    return found


def third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


GRAPH = {module_name(p): imports(p) for p in sorted((SRC / "rlhfkit").rglob("*.py"))}


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def back_edges() -> list[str]:
    bad = []
    for module, deps in GRAPH.items():
        for dep in sorted(deps):
            why = None
            if under(dep, "rlhfkit.fast") and not under(module, "rlhfkit.fast") and module not in FAST_USERS:
                why = "speed paths are imported only by the forward seam, the built-in engine and the training loop"
            elif under(dep, "rlhfkit.engines") and not under(module, "rlhfkit.engines") and module != "rlhfkit.generation":
                why = "generation engines sit below the generation seam: callers use rlhfkit.generation"
            elif under(module, "rlhfkit.eval") and under(dep, "rlhfkit.train"):
                why = "eval never imports train"
            elif under(module, "rlhfkit.data") and not under(dep, "rlhfkit.data") and dep not in (
                    "rlhfkit.errors", "rlhfkit.config"):
                why = "data reads and writes records; it never loads or samples from a model"
            elif module == "rlhfkit.models" and under(dep, "rlhfkit.data.world"):
                why = "models never need the task world"
            elif module in MATH and dep not in MATH:
                why = "math modules import no other part of rlhfkit"
            elif under(dep, "rlhfkit.train") and not (under(module, "rlhfkit.train") or module in (
                    "rlhfkit.cli", "rlhfkit.pipeline")):
                why = "only the CLI and the pipeline run stages"
            if why:
                bad.append(f"{module} imports {dep}: {why}")
    return bad


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_points_against_the_layers():
    assert back_edges() == []


def test_the_module_graph_has_no_cycles():
    assert cycles() == []


@pytest.mark.parametrize("module", sorted(MATH))
def test_math_modules_import_nothing_heavy(module):
    path = SRC / (module.replace(".", "/") + ".py")
    assert third_party(path) - {"__future__", "math", "dataclasses", "enum", "typing", "torch"} == set()


def test_the_walker_sees_what_it_should(tmp_path):
    """The checks can fail: the walker finds function-level imports and `from package import module`,
    and a made-up back edge and cycle are reported."""
    source = tmp_path / "m.py"
    source.write_text("import rlhfkit.losses\ndef f():\n    from rlhfkit.train import rm\n    from rlhfkit.eval.winrate import win_rate\n")
    assert imports(source) == {"rlhfkit.losses", "rlhfkit.train", "rlhfkit.train.rm", "rlhfkit.eval.winrate"}
    assert "rlhfkit.stats" in GRAPH["rlhfkit.eval.evaluate"]  # imported inside a function there
    saved = {k: set(v) for k, v in GRAPH.items()}
    try:
        GRAPH["rlhfkit.eval.winrate"].add("rlhfkit.train.ppo")
        GRAPH["rlhfkit.losses"].add("rlhfkit.eval.winrate")
        assert any("eval never imports train" in b for b in back_edges())
        assert any("math modules" in b for b in back_edges())
        GRAPH["rlhfkit.eval.winrate"].add("rlhfkit.losses")  # and back: a cycle
        assert any({"rlhfkit.eval.winrate", "rlhfkit.losses"} <= set(c) for c in cycles())
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
