"""Shared pytest setup: make the top-level scripts importable and keep CPU tests deterministic."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
