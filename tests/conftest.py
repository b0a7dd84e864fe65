import os
import sys

# Make `tests.helpers` importable and keep XLA on the host CPU.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
