"""The package's shape: imports run one way through its layers, with no cycles, and nothing
imports an entry module. Read from the source with `ast` (nothing is imported), so a new module
that breaks the layering fails here with the offending import named."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medjax"

# Entry modules (`python -m ...`): thin command lines that nothing imports.
ENTRY = {"medjax.train", "medjax.sample", "medjax.export", "medjax.evaluate",
         "medjax.data.make_phantoms", "medjax.data.throughput", "medjax.__main__",
         "medjax.reproduce"}

# Layer of each module, by longest matching prefix: a module may import only modules of its own
# layer or lower ones. Order as in README "Layout".
LAYERS = [
    ("base", ["medjax.errors", "medjax.atomic", "medjax.validation", "medjax.cli",
              "medjax.images", "medjax.paths", "medjax.metrics_writer", "medjax.config_args",
              "medjax.workdir"]),
    ("beside", ["medjax.data", "medjax.sharding", "medjax.checkpoint", "medjax.distributed",
                "medjax.hosts", "medjax.preemption"]),
    ("models", ["medjax.models", "medjax.tokenizer", "medjax.schedulers"]),
    ("convert", ["medjax.convert"]),
    ("assembly", ["medjax.embedded", "medjax.sampling", "medjax.sample_files",
                  "medjax.sample_inputs"]),
    ("pipeline", ["medjax.pipeline", "medjax"]),  # `medjax/__init__` exports StableDiffusion
    ("objectives", ["medjax.objectives", "medjax.train_config", "medjax.eval.inception",
                    "medjax.eval.classifiers",
                    "medjax.eval.auc", "medjax.eval.recon", "medjax.eval.fid",
                    "medjax.eval.memorization", "medjax.eval.inception_weights",
                    "medjax.eval.classifier_weights", "medjax.eval.provenance",
                    "medjax.eval.image_store"]),
    ("trainer", ["medjax.batches", "medjax.trainer", "medjax.eval.classifier_train",
                 "medjax.run_outputs"]),
    ("protocols", ["medjax.eval", "medjax.exporter", "medjax.paper_tables",
                   "medjax.embedded_recipe"]),
    ("entry", sorted(ENTRY)),
]


def _module_name(path: Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, Path]:
  return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
  best, best_len = None, -1
  for rank, (_, prefixes) in enumerate(LAYERS):
    for prefix in prefixes:
      # "medjax" itself names only the package's __init__, not every module below it
      within = module.startswith(prefix + ".") and prefix != "medjax"
      if (module == prefix or within) and len(prefix) > best_len:
        best, best_len = rank, len(prefix)
  if best is None:
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py: add it there "
                         "and to README 'Layout'")
  return best


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
  """medjax modules that `module` imports (anywhere in the file), with line numbers."""
  tree = ast.parse(path.read_text(), filename=str(path))
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from medjax.x import y` imports medjax.x.y when that is a module, else medjax.x.
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    for name in names:
      if name == "medjax" or name.startswith("medjax."):
        while name not in known and "." in name:
          name = name.rpartition(".")[0]
        if name != module and (name, node.lineno) not in out:
          out.append((name, node.lineno))
  return out


def _graph() -> dict[str, list[tuple[str, int]]]:
  modules = _modules()
  known = set(modules)
  return {m: _imports(m, p, known) for m, p in modules.items()}


def test_every_module_has_a_layer():
  for module in _modules():
    _layer(module)


def test_no_upward_imports():
  bad = []
  for module, deps in _graph().items():
    for dep, line in deps:
      if _layer(dep) > _layer(module):
        bad.append(f"{module}:{line} imports {dep} "
                   f"({LAYERS[_layer(module)][0]} < {LAYERS[_layer(dep)][0]})")
  assert not bad, "upward imports:\n" + "\n".join(bad)


def test_nothing_imports_an_entry_module():
  bad = [f"{m}:{line} imports {dep}" for m, deps in _graph().items()
         for dep, line in deps if dep in ENTRY]
  assert not bad, "entry modules imported:\n" + "\n".join(bad)


def test_no_import_cycles():
  graph = {m: sorted({d for d, _ in deps}) for m, deps in _graph().items()}
  # a package's __init__ re-exporting its submodules is not a cycle of the code's logic
  def edges(m):
    return [d for d in graph[m] if not (m.startswith(d + ".") and
                                        _modules()[d].name == "__init__.py")]
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in edges(m):
      if state.get(d) == "open":
        cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("limit", [500])
def test_no_module_over_limit(limit):
  long = {m: n for m, p in _modules().items()
          if (n := len(p.read_text().splitlines())) > limit}
  assert not long, f"modules over {limit} lines: {long}"


def test_structure_test_catches_an_upward_import(tmp_path):
  """The checker itself: a models module importing the pipeline is reported."""
  fake = tmp_path / "medjax" / "models" / "bad.py"
  fake.parent.mkdir(parents=True)
  fake.write_text("from medjax import pipeline\nimport medjax.train\n")
  known = set(_modules())
  deps = _imports("medjax.models.bad", fake, known)
  assert ("medjax.pipeline", 1) in deps and ("medjax.train", 2) in deps
  assert _layer("medjax.pipeline") > _layer("medjax.models.bad")


def test_readme_layout_names_every_module():
  """README 'Layout' stays the map of the tree: each module (file or package) is named there."""
  text = (ROOT / "README.md").read_text()
  start = text.index("## Layout")
  layout = text[start:text.index("```", text.index("```", start) + 3)]
  missing = []
  for path in PACKAGE.rglob("*.py"):
    rel = path.relative_to(PACKAGE)
    if rel.name == "__init__.py":
      continue
    names = {rel.name, rel.stem}
    if len(rel.parts) > 1:
      names.add(f"{rel.parts[0]}/{rel.name}")
    if not any(n in layout for n in names):
      missing.append(str(rel))
  assert not missing, f"README 'Layout' does not name: {sorted(missing)}"
