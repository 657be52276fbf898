"""The project's import graph: no module imports itself back through others, packages only
import their own layer or the layers below, and a project module is imported inside a
function only where :data:`DEFERRED` says why.

Edges count function-level imports too, so a deferred import can never be what hides a
cycle.  Importing ``a.b.c`` runs ``a`` and ``a.b`` first, so it is an edge to each of them,
except to the importer's own enclosing packages (already running when it is imported).
Tests are not project modules here: they import what they test, where they like.
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lowest first: FoT (the method's attention, kernels, data pipelines and exported PyTorch
# model) stands alone, EasyLM (model, training, checkpoints) builds on it, and the
# evaluations, experiments, benchmarks and launcher on both.
LAYERS = (("FoT",), ("EasyLM",), ("eval", "experiments", "benchmarks", "running_utils"))
PACKAGES = tuple(name for layer in LAYERS for name in layer)

# (importer, imported module) -> why the import sits inside a function.
DEFERRED = {
    ("FoT.hf", "FoT.hf.configuration_fot_llama"):
        "transformers; the JAX side imports FoT.hf for MODEL_FILES and plan_windows",
    ("eval.models", "FoT.hf.modeling_fot_llama"):
        "torch and transformers, only when an exported PyTorch model is evaluated",
    ("eval.models", "FoT.hf.cache_fot_llama"):
        "torch, only when an exported PyTorch model is evaluated",
    ("EasyLM.models.llama.convert_easylm_to_hf", "FoT.hf.tokenization_sentencepiece_llama"):
        "sentencepiece and transformers' tokenizer classes, only for a SentencePiece export",
    ("running_utils.runner_utils", "EasyLM.models.llama.llama_train"):
        "JAX: the benchmarks read the runner's memory defaults without importing it",
}
# Benchmark drivers start each measurement in a subprocess whose environment (memory
# fraction, XLA flags) must be set before JAX loads, so everything that imports JAX is
# imported in the worker functions.
for _module in ("EasyLM.jax_utils", "EasyLM.models.llama.llama_model",
                "EasyLM.optimizers", "EasyLM.trainer", "EasyLM.forgetting", "EasyLM.linear",
                "EasyLM.models.llama.attention"):
    DEFERRED[("benchmarks.bench_train", _module)] = "JAX, in the worker subprocess only"
for _module in ("EasyLM.flops", "FoT.cross_batch", "FoT.slots"):
    DEFERRED[("benchmarks.bench_attention", _module)] = "JAX, in the worker subprocess only"
for _jax_module in ("EasyLM.models.llama.llama_model", "EasyLM.models.llama.windowed_lm",
                    "FoT.inference"):
    DEFERRED[("benchmarks.bench_inference", _jax_module)] = \
        "JAX, only with --framework jax: JAX preallocates the GPU the PyTorch run measures"
for _module in ("EasyLM.linear", "EasyLM.linear.scan"):
    DEFERRED[("benchmarks.bench_linear", _module)] = \
        "JAX, in the worker subprocesses only (the fla worker keeps it on the CPU)"
DEFERRED[("benchmarks.bench_train", "benchmarks.collectives")] = \
    "the collectives part's driver, beside the JAX imports of the worker that runs it"


def project_modules():
    """``{module name: path}`` of every Python file of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for root, dirs, files in os.walk(os.path.join(REPO, package)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            for name in files:
                if not name.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(root, name), REPO)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = os.path.join(root, name)
    return modules


def _imported_names(node, module, is_package):
    """Dotted names an import statement asks for (``from p import x`` asks for ``p.x``,
    which is a module or a name defined in ``p``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


def _imports(tree, module, is_package):
    """``[(imported name, inside a function?)]`` of a parsed module."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((name, in_function)
                             for name in _imported_names(child, module, is_package))
            visit(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def import_graph():
    """``({module: set of project modules its imports run}, {(module, project module it
    imports inside a function)})``."""
    modules = project_modules()
    graph, deferred = {}, set()
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        edges = graph.setdefault(module, set())
        for name, in_function in _imports(tree, module, path.endswith("__init__.py")):
            parts = name.split(".")
            run = [".".join(parts[:i]) for i in range(1, len(parts) + 1)
                   if ".".join(parts[:i]) in modules]
            edges.update(target for target in run
                         if target != module and target not in own_packages)
            if in_function and run:
                deferred.add((module, run[-1]))
    return graph, deferred


GRAPH, DEFERRED_FOUND = import_graph()


def test_the_graph_covers_the_project():
    assert {"FoT.cross_batch", "FoT.kernels.plan", "EasyLM.models.llama.llama_model",
            "eval.models"} <= set(GRAPH)
    assert GRAPH["FoT.cross_batch"] == {"FoT.kernels", "FoT.slots"}


def test_no_import_cycles():
    done, path = set(), []

    def visit(module):
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for target in sorted(GRAPH[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_mesh_axes_are_named_only_in_the_logical_axes_table():
    # The model, its attention families and FoT's sharded attention name logical axes; a mesh
    # axis spelled out among them would escape the one table that maps the two.
    from FoT.logical_axes import MESH_AXES
    spelled = []
    for module, path in sorted(project_modules().items()):
        if module == "FoT.logical_axes" or not module.startswith(
                ("FoT", "EasyLM.models", "EasyLM.jax_utils")):
            continue
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        spelled += [f"{module}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and node.value in MESH_AXES]
    assert not spelled, f"mesh axes named outside FoT.logical_axes: {spelled}"


ATTENTION = "EasyLM.models.llama.attention"


def test_attention_families_sit_below_the_decoder():
    # Families use the shared projections, rotary embedding, sharding helpers, FoT's
    # attention and the forgetting and linear attention maths; the decoder and what runs it
    # import them, never the other way round.
    allowed = {"EasyLM.jax_utils", "EasyLM.models.llama.rope", "EasyLM.forgetting",
               "EasyLM.linear"}
    families = [m for m in GRAPH if m == ATTENTION or m.startswith(ATTENTION + ".")]
    assert f"{ATTENTION}.interface" in families
    above = sorted((module, target) for module in families for target in GRAPH[module]
                   if not (target in allowed or target.split(".")[0] == "FoT"
                           or target.startswith(ATTENTION)))
    assert not above, f"attention families importing the decoder or above: {above}"


def test_packages_import_only_their_layer_or_lower():
    level = {package: i for i, layer in enumerate(LAYERS) for package in layer}
    upward = sorted((module, target) for module, edges in GRAPH.items() for target in edges
                    if level[target.split(".")[0]] > level[module.split(".")[0]])
    assert not upward, f"imports from a higher layer: {upward}"


def test_function_level_imports_are_declared():
    undeclared = sorted(DEFERRED_FOUND - set(DEFERRED))
    assert not undeclared, f"project modules imported inside functions with no reason in " \
        f"DEFERRED: {undeclared}"
    stale = sorted(set(DEFERRED) - DEFERRED_FOUND)
    assert not stale, f"DEFERRED lists imports that no longer exist: {stale}"
