"""SimpleTuner: fine-tune text-to-image diffusion models.

Importing the package is cheap on purpose: heavy libraries (torch, diffusers,
transformers) are imported by the modules that need them, so `simpletuner --help`
and `simpletuner config check` answer in about a second.
"""

__version__ = "0.1.0"
