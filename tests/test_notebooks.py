"""The notebooks run top to bottom from a clean checkout, and the committed ones show their outputs."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'notebooks')
NOTEBOOKS = ('feature_reuse.ipynb', 'architecture.ipynb')
CELL_TIMEOUT_S = 300  # the slowest cell (training on digits) takes about a minute on a 2-core CPU


def read(name):
  return nbformat.read(os.path.join(NOTEBOOKS_DIR, name), as_version=4)


def outputs(notebook, kind):
  return [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs if o.output_type == kind]


def figures(notebook) -> int:
  return sum('image/png' in o.data for o in outputs(notebook, 'display_data') + outputs(notebook, 'execute_result'))


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_committed_notebook_was_run_top_to_bottom_and_shows_its_figures(name):
  notebook = read(name)
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
  assert not outputs(notebook, 'error')
  assert figures(notebook) >= 3


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_from_a_clean_checkout(name):
  notebook = read(name)
  committed_figures = figures(notebook)
  before = sorted(os.listdir(NOTEBOOKS_DIR))
  # Jupyter's way: a fresh kernel started in notebooks/; any failing cell raises CellExecutionError.
  NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                 resources={'metadata': {'path': NOTEBOOKS_DIR}}).execute()
  assert not outputs(notebook, 'error')
  assert figures(notebook) == committed_figures
  assert sorted(os.listdir(NOTEBOOKS_DIR)) == before  # nothing left behind
