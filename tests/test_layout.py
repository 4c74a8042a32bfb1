"""The modules import downwards only: measurement knows nothing of plots or training, analysis
nothing of the trainer, the trainer nothing of the studies."""
import ast
import glob
import os
import re

from conftest import REPO

# Bottom to top. A module may import modules of lower layers only (data/ modules also each other).
LAYERS = [{"data", "model"}, {"rundir"}, {"spectra"}, {"features"}, {"plots"}, {"measure"}, {"analyze"}, {"train_gpt"},
          {"conditions", "sweep"}]


def imports_of(path, ours):
    """The project modules a file imports anywhere in it (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in ours)
    return found


def import_graph():
    paths = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "data", "*.py"))
    ours = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "*.py"))} | {"data"}
    graph = {}
    for p in paths:
        name = "data" if os.path.basename(os.path.dirname(p)) == "data" else os.path.basename(p)[:-3]
        graph.setdefault(name, set()).update(imports_of(p, ours) - {name})
    return graph


def find_cycle(graph):
    """A list of modules forming an import cycle, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None
    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_every_import_points_down():
    graph = import_graph()
    layer = {m: i for i, group in enumerate(LAYERS) for m in group}
    assert set(graph) == set(layer), f"place every module in LAYERS: {sorted(set(graph) ^ set(layer))}"
    upward = [f"{m} (layer {layer[m]}) imports {t} (layer {layer[t]})" for m, targets in graph.items()
              for t in targets if layer[t] >= layer[m]]
    assert not upward, upward
    assert find_cycle(graph) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_ci_names_no_path_of_one_machine():
    text = open(os.path.join(REPO, ".ci", "run")).read()
    absolute = [line for line in text.splitlines()[1:] if not line.lstrip().startswith("#")
                and re.search(r"(?<![\w.$}])/(?!dev/null)\w", line)]
    assert not absolute, absolute
