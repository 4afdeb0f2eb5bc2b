import sys
from pathlib import Path

# tests import the top-level modules (model.py, data.py, ...) directly, as a reader would
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
