"""Makes this family's input builders (``*_inputs.py``) importable from its tests."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
