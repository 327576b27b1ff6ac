"""Run configs: the engine's and shared defaults, the checks run before any work, the ladder's arms."""
