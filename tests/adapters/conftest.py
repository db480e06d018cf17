import os
import sys

# The tiny model builders live one folder up, in tests/tiny_models.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
