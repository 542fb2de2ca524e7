"""blt-data: entropy-patched byte datasets for the Byte Latent Transformer."""

__version__ = "0.1.0"
