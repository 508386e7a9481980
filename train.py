"""Train PVA with LightningCLI: ``python train.py fit --config configs/<name>.yaml``.

``python train.py --help`` documents every option; ``--print_config`` builds no model.
"""

from __future__ import annotations

import warnings

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from callbacks import AdapterExport  # noqa: F401 - importable by class name in configs
from pva.module import PVAModule


class PVACLI(LightningCLI):
    """LightningCLI whose data batch size also scales the PVA learning rate."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments("data.init_args.batch_size", "model.batch_size")


def main() -> None:
    """Entry point."""
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # PVAConfig field docs
    PVACLI(PVAModule, subclass_mode_data=True, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
