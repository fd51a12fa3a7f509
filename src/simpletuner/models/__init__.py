"""Model families: one interface (`base.ModelFamily`), one module per architecture, one registry.

`from simpletuner.models.registry import get_family` is light; `base` imports torch.
"""
