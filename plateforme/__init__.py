"""plateforme: La Plateforme endpoints on Triton."""
__version__ = "0.1.0"
