"""`embtune plan`: what the machine can afford, measured by real training steps (docs/plan.md).

probe.py (the data's longest texts as worst-case rows) -> measure.py (a short real `embtune
train` per grid point: peak memory, texts/s) -> memory_fit.py (memory against texts per step)
-> recommend.py (batch x group, cache chunk, precision, and why).
"""
