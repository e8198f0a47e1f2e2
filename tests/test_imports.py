"""What the modules of densenet_jax import: no cycles, and loading weights starts neither orbax nor the training loop."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inference_analysis_and_weights_import_neither_orbax_nor_the_training_loop():
  # Reading weights for a prediction or a plot needs neither: orbax loads when a checkpoint is opened.
  code = ('import sys; import densenet_jax.inference, densenet_jax.analysis, densenet_jax.weights; '
          'bad = sorted(m for m in sys.modules if m.split(".")[0] == "orbax" or m == "densenet_jax.training.loop"); '
          'print(bad); sys.exit(1 if bad else 0)')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr


def _modules() -> dict[str, str]:
  """{module name: file} of every module of densenet_jax."""
  modules = {}
  for directory, _, files in os.walk(os.path.join(ROOT, 'densenet_jax')):
    for name in files:
      if name.endswith('.py'):
        parts = os.path.relpath(os.path.join(directory, name), ROOT)[:-len('.py')].split(os.sep)
        modules['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = os.path.join(directory, name)
  return modules


def _run_at_import(node: ast.AST):
  """The import statements that run when the module of `node` is imported: those outside functions."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.Import, ast.ImportFrom)):
      yield child
    elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      yield from _run_at_import(child)


def _imported(module: str, path: str, modules: dict[str, str]) -> set[str]:
  """The modules of densenet_jax that `module` imports when it is imported.

  `from package import name` depends on the module package.name if there is one, else on the package's __init__;
  the parent packages Python initializes on the way are no dependency of their own (a package's __init__ importing
  its submodules, which import their siblings through it, is no cycle).
  """
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  is_package = os.path.basename(path) == '__init__.py'
  targets = set()
  for node in _run_at_import(tree):
    if isinstance(node, ast.Import):
      targets.update(alias.name for alias in node.names)
      continue
    base = node.module or ''
    if node.level:  # relative: from the package of `module`
      package = module.split('.')[:len(module.split('.')) - node.level + is_package]
      base = '.'.join(package + ([base] if base else []))
    for alias in node.names:
      targets.add(f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base)
  return {t for t in targets if t in modules and t != module}


def test_no_module_of_densenet_jax_imports_itself_through_others():
  # A cycle works or fails depending on which of its modules is imported first; one home per concern has none.
  modules = _modules()
  graph = {name: _imported(name, path, modules) for name, path in modules.items()}
  # The local lock reaches the gs:// one at the top, and neither imports the other in a circle.
  assert graph['densenet_jax.io.lock'] == {f'densenet_jax.io.{m}' for m in ('cloud_lock', 'lock_record', 'storage')}
  done, cycles = set(), []

  def visit(name: str, chain: list[str]) -> None:  # depth first; `chain`: the imports that lead to `name`
    chain = chain + [name]
    for target in sorted(graph[name]):
      if target in chain:
        cycles.append(' -> '.join(chain[chain.index(target):] + [target]))
      elif target not in done:
        visit(target, chain)
    done.add(name)

  for name in sorted(graph):
    if name not in done:
      visit(name, [])
  assert not cycles, 'Import cycles:\n' + '\n'.join(cycles)
