"""The machine a run is on: XLA:CPU kernels, simulated CPU devices, multi-host start-up."""
