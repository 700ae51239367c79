"""The parts of scripts/bench.py (and scripts/memory.py): topology, systems under test,
measurement and reporting, one module each."""
