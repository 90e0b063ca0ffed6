"""mlsteps: multi-step language-model training from one YAML recipe."""

__version__ = "0.1.0"
