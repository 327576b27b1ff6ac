"""XLA flags for test processes (no jax import: conftest reads this before jax starts)."""

# XLA:CPU flag every test process compiles with (conftest.py; subprocesses add it to their own
# XLA_FLAGS): LLVM at -O0 compiles the tiny test programs in about half the time, and the suite
# is mostly compiling (measured: resume, methods, runs and pin tests 166 s -> 133 s on 2 cores).
# Same maths; tests compare code paths built with the same flags. Users' runs are unaffected.
FAST_COMPILE = "--xla_backend_optimization_level=0"
