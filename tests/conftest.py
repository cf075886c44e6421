import sys
from pathlib import Path

# Make the tests' helper modules (oracle.py, ...) importable as plain modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))
