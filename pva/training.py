"""Training with LightningCLI: ``python train.py fit --config ...`` and ``pva train fit ...``.

``--help`` documents every option; ``--print_config`` builds no model. A config value out of its
range (``model.lr_pva: nan``, ``data.batch_size: 0``) and a split with nothing readable stop with
one line (``train.py: error: ...`` / ``pva train: error: ...``) and exit status 2.
"""

from __future__ import annotations

import sys
import warnings

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from callbacks import AdapterExport  # noqa: F401 - importable by class name in configs
from pva.checks import RangeError
from pva.data.reader import ShardReadError
from pva.module import PVAModule


class PVACLI(LightningCLI):
    """LightningCLI linking the data to the model: batch size and modifier token.

    ``data.batch_size`` also scales the PVA learning rate; the data's prompts use the model's
    ``model.pva.modifier_token`` (set only there).
    """

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments("data.init_args.batch_size", "model.batch_size")
        parser.link_arguments("model.pva.modifier_token", "data.init_args.modifier_token")


def _user_error(err: BaseException) -> str | None:
    """The one-line message of a user-fixable error anywhere in ``err``'s chain, else ``None``.

    jsonargparse wraps errors raised while it builds a ``class_path`` object, and a DataLoader
    worker re-raises its error with the worker's traceback in the message: both are unwrapped.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, RangeError | ShardReadError):
            text = str(seen).strip()
            marker = f"{type(seen).__name__}: "
            return text.rsplit(marker, 1)[-1].strip() if marker in text else text
        seen = seen.__cause__ or seen.__context__
    return None


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    """Run LightningCLI on ``argv`` (default: the command line); returns the exit status.

    Args:
        argv: Arguments after the program name (``fit --config ...``); ``None``: ``sys.argv``.
        prog: The program name in error lines (``train.py`` or ``pva train``).
    """
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # PVAConfig field docs
    try:
        PVACLI(
            PVAModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=argv,
            parser_kwargs={"prog": prog},
        )
    except Exception as err:
        message = _user_error(err)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0
