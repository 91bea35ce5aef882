"""Makes this family's shared test helpers (``power_linear_cases.py``) importable from its tests."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
