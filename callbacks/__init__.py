"""Lightning callbacks and plugins for PVA training."""

from callbacks.adapter_export import AdapterExport
from callbacks.checkpoint_io import AtomicCheckpointIO
from callbacks.crash import SimulatedCrash
from callbacks.identity import IdentityValidation, PersonalizationCheck
from callbacks.progress import StepProgressBar

__all__ = [
    "AdapterExport",
    "AtomicCheckpointIO",
    "IdentityValidation",
    "PersonalizationCheck",
    "SimulatedCrash",
    "StepProgressBar",
]
