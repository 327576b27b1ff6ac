"""Stable Diffusion v1.x in Flax, for DiffDFKD's teacher-guided synthesis.

Our own small modules for the three networks (CLIP text encoder, conditional
UNet, VAE decoder), with converters from diffusers-format safetensors that need
neither torch nor a network. See `caedfkd_jax/methods/diffdfkd.py` for the method.
"""
