"""Lightning callbacks for PVA training."""

from callbacks.adapter_export import AdapterExport

__all__ = ["AdapterExport"]
