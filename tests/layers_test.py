"""The package's layers import downward only (docs/architecture.md), and nothing is flat."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "caedfkd_jax"
# Top to bottom; a layer may import its own modules and any layer after it in this list.
LAYERS = ["cli", "engine", "config", "methods", "transfer", "eval", "synthesis", "diffusion", "io",
          "models", "runtime"]
# Neighbours in the list that are of equal rank: neither imports the other.
PEERS = {("eval", "diffusion"), ("synthesis", "diffusion"),
         ("models", "runtime")}


def _imports(path: pathlib.Path) -> set[str]:
  """The caedfkd_jax subpackages a module imports, at its top or inside functions."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else
             [a.name for a in node.names] if isinstance(node, ast.Import) else [])
    for name in names:
      parts = name.split(".")
      if parts[0] == "caedfkd_jax":
        if len(parts) > 1:
          found.add(parts[1])
        else:   # from caedfkd_jax import models
          found.update(a.name for a in node.names)
  return found


def test_the_package_has_no_modules_at_the_top_level():
  modules = {p.name for p in PACKAGE.glob("*.py")}
  assert modules == {"__init__.py", "__main__.py"}
  assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")} == {
      *LAYERS, "configs"}


def test_every_layer_imports_only_downward():
  rank = {layer: i for i, layer in enumerate(LAYERS)}
  upward = []
  for layer in LAYERS:
    for path in sorted((PACKAGE / layer).rglob("*.py")):
      for imported in _imports(path) - {layer}:
        if imported not in rank:
          continue
        if rank[imported] < rank[layer] or (layer, imported) in PEERS or (imported, layer) in PEERS:
          upward.append(f"{path.relative_to(PACKAGE)} imports {imported}")
  assert not upward, upward
