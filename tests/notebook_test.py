"""The Colab notebook executes top to bottom (small settings), so it cannot rot."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "cae_dfkd_losses.ipynb"


@pytest.mark.slow
def test_notebook_executes_and_draws(tmp_path, monkeypatch):
  monkeypatch.setenv("CAEDFKD_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as in Colab
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) >= 4          # CEND, CNCL, loss curves, synthetic digits
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
