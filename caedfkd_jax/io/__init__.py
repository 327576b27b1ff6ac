"""What goes on disk and comes back: bundles, PyTorch conversion and export, embeddings, data."""
