"""The notebooks (notebooks/*.ipynb, built from notebooks/src/*.py by notebooks/build.py).

For each notebook: the committed .ipynb has exactly the cells of its source and carries the outputs of a full,
error-free run (figures included, not the reduced CI sizes); and a fresh python3 kernel runs it top to bottom with
MINDMD2_NB_FAST=1 (fewer training steps, same cells), in notebooks/, without an error, drawing at least as many
figures as the notebook is meant to show, and without leaving files in notebooks/.
"""
import importlib.util
import os

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError, CellTimeoutError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("notebook_build", os.path.join(ROOT, "notebooks", "build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

# The figures each notebook is meant to show (PNG outputs); a notebook that silently stops drawing fails.
MIN_FIGURES = {"toy2d": 13, "sdxl": 5, "imagenet64": 5, "neighbours": 4}
FAST_MARK = "MINDMD2_NB_FAST=1"          # printed by a notebook's first cell when it runs with reduced sizes


def committed(name):
    path = build.notebook_path(name)
    assert os.path.exists(path), f"{path} is missing: run python notebooks/build.py {name}"
    return nbformat.read(path, as_version=4)


def outputs_text(nb):
    return "\n".join(str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def test_every_source_has_a_notebook_and_the_other_way_round():
    sources = {f[:-3] for f in os.listdir(os.path.join(build.HERE, "src")) if f.endswith(".py")}
    notebooks = {f[:-6] for f in os.listdir(build.HERE) if f.endswith(".ipynb")}
    assert sources == notebooks == set(build.NAMES)


@pytest.mark.parametrize("name", build.NAMES)
def test_committed_notebook_matches_its_source(name):
    nb, src = committed(name), build.read_source(name)
    assert build.cells(nb) == build.cells(src), \
        f"notebooks/{name}.ipynb differs from notebooks/src/{name}.py: run python notebooks/build.py {name}"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.metadata["jupytext"]["formats"] == "ipynb,src//py:percent"


@pytest.mark.parametrize("name", build.NAMES)
def test_committed_notebook_carries_a_full_run(name):
    nb = committed(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "some cells were never executed"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "not one top-to-bottom run"
    errors = [out for c in code for out in c.outputs if out.output_type == "error"]
    assert not errors, f"the committed notebook shows an error: {errors[0].ename}: {errors[0].evalue}"
    assert build.image_outputs(nb) >= MIN_FIGURES[name]
    assert FAST_MARK not in outputs_text(nb), "the committed outputs come from a reduced (MINDMD2_NB_FAST=1) run"
    stderr = [out.text for c in code for out in c.outputs if out.output_type == "stream" and out.name == "stderr"]
    assert not stderr, f"the committed notebook shows warnings or progress bars on stderr: {stderr[0][:500]}"


def listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, dirs, fs in os.walk(folder)
                  for f in fs if "__pycache__" not in d and ".ipynb_checkpoints" not in d)


@pytest.mark.parametrize("name", build.NAMES)
def test_notebook_runs_headless(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MINDMD2_NB_FAST", "1")
    nb = committed(name)
    for cell in nb.cells:                                   # a clean copy: no outputs, no execution counts
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    before = listing(build.HERE)
    try:
        build.execute(nb, timeout=300, cwd=build.HERE)      # a fresh python3 kernel started in notebooks/
    except (CellExecutionError, CellTimeoutError):
        pytest.fail(f"notebooks/{name}.ipynb failed in a fresh kernel:\n{build.error_summary(nb)}", pytrace=False)
    finally:
        nbformat.write(nb, str(tmp_path / f"{name}.ipynb"))  # the executed copy, for inspection
    assert FAST_MARK in outputs_text(nb)                    # the switch reached the kernel
    assert build.image_outputs(nb) >= MIN_FIGURES[name]
    assert listing(build.HERE) == before, "the notebook left files in notebooks/ (write to a temporary folder)"


def test_build_check_says_what_matched_and_out_must_be_a_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        build.main(["--check", "toy2d"])
    assert exit_.value.code == 0 and "1 notebook(s) match their sources: toy2d" in capsys.readouterr().out
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        build.main(["--out", str(tmp_path / "a_file"), "toy2d"])
    assert exit_.value.code == 2 and "is a file; give a folder" in capsys.readouterr().err
