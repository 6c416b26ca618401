""":class:`InfluenceCallback` for the ``lightning`` package's namespace, ``lightning.pytorch``.

``lightning_influence.InfluenceCallback`` derives from ``pytorch_lightning.Callback``: it runs inside a
``lightning.pytorch.Trainer`` too, but ``lightning.pytorch.cli.LightningCLI`` accepts only subclasses of its
own ``Callback``. This one is the same implementation on that base::

    trainer:
      callbacks:
        - class_path: lightning_influence.lightning.InfluenceCallback
          init_args: {num_queries: 8, solver: ekfac}

Importing this module needs ``pip install lightning``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from .callback import InfluenceCallbackBase

__all__ = ["InfluenceCallback"]


class InfluenceCallback(InfluenceCallbackBase, Callback):
    __doc__ = InfluenceCallbackBase.__doc__
