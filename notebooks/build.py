"""Build the executed notebooks from their sources.

The sources are jupytext percent-format scripts in notebooks/src/ (easy to diff and review); each
notebooks/NAME.ipynb is generated from one, executed top to bottom on the CPU, and written with its
outputs, figures as PNG, so a reader sees everything without running it. The pairing is also recorded
in each notebook's metadata (jupytext formats "ipynb,src//py:percent"), so Jupyter with jupytext
keeps both sides in sync when you edit either.

    python notebooks/build.py                  # all four (neighbours alone: several minutes on 2 CPU cores)
    python notebooks/build.py toy2d sdxl       # some of them
    python notebooks/build.py --check          # no execution: fail if a .ipynb's cells differ from its source
    MINDMD2_NB_FAST=1 python notebooks/build.py --out /tmp/nb   # CI's reduced sizes, written elsewhere

Commit the .ipynb files built WITHOUT MINDMD2_NB_FAST (the reduced runs draw less convincing pictures).
Needs jupytext, nbformat, nbclient and ipykernel (tests/requirements.txt); the kernel is "python3",
which ipykernel installs with itself, run by the same interpreter as this script.
"""
import argparse
import os
import re
import sys
import time

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("toy2d", "sdxl", "imagenet64", "neighbours")
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def source_path(name):
    return os.path.join(HERE, "src", name + ".py")


def notebook_path(name, folder=HERE):
    return os.path.join(folder, name + ".ipynb")


def read_source(name):
    """The notebook of notebooks/src/NAME.py, without outputs, with stable cell ids (clean git diffs)."""
    nb = jupytext.read(source_path(name))
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["jupytext"] = {"formats": "ipynb,src//py:percent"}
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name}-{i:02d}"
        cell.metadata.pop("lines_to_next_cell", None)
    return nb


def cells(nb):
    """What must agree between a source and its notebook: the kind and text of every cell."""
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def execute(nb, timeout=600, cwd=HERE):
    """Run every cell in a fresh python3 kernel started in `cwd`; raises CellExecutionError on the first error."""
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": cwd}})
    client.execute()
    return nb


def error_summary(nb):
    """The first failing cell of an executed notebook as plain text (no ANSI colours): its source and error."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(out.traceback))
                return f"cell {i}:\n{cell.source}\n----\n{tb[-3000:]}"
    return "no error output found"


def image_outputs(nb):
    """How many PNG figures the executed notebook carries."""
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def check(names):
    stale = [n for n in names if not os.path.exists(notebook_path(n))
             or cells(nbformat.read(notebook_path(n), as_version=4)) != cells(read_source(n))]
    for n in stale:
        print(f"{notebook_path(n)} is missing or out of date with {source_path(n)}: run python notebooks/build.py {n}")
    if not stale:
        print(f"{len(names)} notebook(s) match their sources: {', '.join(names)}")
    return not stale


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(NAMES), help=f"notebooks to build, of {', '.join(NAMES)}")
    parser.add_argument("--check", action="store_true", help="only check that every notebook in notebooks/ matches its "
                        "source (with --out: refused, since --check reads the committed notebooks)")
    parser.add_argument("--out", default=HERE, help="folder for the executed .ipynb files")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        parser.error(f"unknown notebook(s) {unknown}: choose from {list(NAMES)}")
    if args.check:
        if os.path.abspath(args.out) != os.path.abspath(HERE):
            parser.error("--check checks the notebooks in notebooks/, not a folder given with --out")
        sys.exit(0 if check(args.names) else 1)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out}: is a file; give a folder for the executed notebooks")
    os.makedirs(args.out, exist_ok=True)
    for name in args.names:
        start = time.time()
        nb = read_source(name)
        try:
            execute(nb, args.timeout)
        except (CellExecutionError, CellTimeoutError):
            sys.exit(f"{source_path(name)} failed:\n{error_summary(nb)}")
        path = notebook_path(name, args.out)
        tmp = path + ".tmp"
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
        print(f"{path}: {len(nb.cells)} cells, {image_outputs(nb)} figures, executed in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
