"""``bench.py``'s measurements: phase timers, FLOPs, memory, data-loader rates, the reference
trainer's step, and the GPU suite."""
