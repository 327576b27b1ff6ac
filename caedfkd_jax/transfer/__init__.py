"""Dense transfer (issue 27): NYUv2's multi-task metrics as LibMTL computes them, and a
procedural NYUv2-layout dataset for tests and CPU studies."""
