"""Writing trained adapters in other frameworks' formats."""

from jaxmoelora.export.peft import export_peft

__all__ = ["export_peft"]
