"""Config files for `caedfkd distill --config`, installed as `caedfkd_jax.configs`."""
