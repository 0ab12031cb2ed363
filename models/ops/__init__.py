"""Hot loops: each op folder holds reference.py (the oracle) beside its fast forms."""
