""":class:`InfluenceCallback` under the ``lightning`` package's name, ``lightning_influence.lightning``.

An alias: ``lightning_influence.InfluenceCallback`` derives from ``pytorch_lightning.Callback`` and, when
``lightning`` is installed, from ``lightning.pytorch.Callback`` too, so both Trainers and both ``LightningCLI``\\ s
take the one class. Configurations written for the earlier, separate class keep working::

    trainer:
      callbacks:
        - class_path: lightning_influence.lightning.InfluenceCallback   # the same as lightning_influence.InfluenceCallback
          init_args: {num_queries: 8, solver: ekfac}
"""

from __future__ import annotations

from .integration.callback import InfluenceCallback

__all__ = ["InfluenceCallback"]
