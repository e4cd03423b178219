"""The Colab notebooks: stored without outputs, and they run headless with small parameters."""

import os

import nbformat
import pytest
from conftest import ROOT

nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = {
    "quickstart": """
IDX_DIR = {idx_dir!r}
DATA_DIR = {tfds_dir!r}
WORKDIR = {workdir!r}
NUM_ROUNDS, NUM_CLIENTS, CLIENTS_PER_ROUND = 2, 8, 3
ALLOCATION = "pgd"
""",
    "scale_sweep": """
PRESET, IMAGE_SIZE, CUT_LAYER = "tiny", 28, 1
DEVICES = [10, 200]
DRAWS = 4
METHODS = ["equal", "pgd"]
PGD_STEPS = 50
""",
}


def _read(name):
    return nbformat.read(os.path.join(ROOT, "colab", f"{name}.ipynb"), as_version=4)


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(name):
    notebook = _read(name)
    cells = [c for c in notebook.cells if c.cell_type == "code"]
    assert cells and all(not c.outputs and c.execution_count is None for c in cells)
    tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "one parameters cell sets every size"
    # No logic of their own: no function or class definitions.
    assert not any(
        line.lstrip().startswith(("def ", "class "))
        for c in cells
        for line in c.source.splitlines()
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs_headless(name, tmp_path, idx_dir, tfds_dir, monkeypatch):
    # The kernel inherits the environment: the scale sweep's run time is its pgd solves, which
    # XLA's optimisation passes make 3x faster (tests/conftest.py turns them off by default).
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    notebook = _read(name)
    params = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    params.source += "\n# Test overrides\n" + NOTEBOOKS[name].format(
        idx_dir=idx_dir, tfds_dir=tfds_dir, workdir=str(tmp_path / "run")
    )
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "backend" in text and "device(s)" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, "the notebook's figure"
    if name == "quickstart":
        assert os.path.exists(tmp_path / "run" / "metrics.jsonl")
    else:
        assert "S=   200" in text and "SFLAM, pgd" in text and "FL" in text
