"""Checkpointed callback state under a key that tells instances apart.

Lightning stores each callback's ``state_dict()`` under its ``state_key``, by default the class
name, so two instances of one class (two drift monitors with other thresholds) would overwrite
each other. Like Lightning's ``EarlyStopping`` and ``ModelCheckpoint``, every stateful callback
of this project derives its key from the options that make an instance distinct
(:meth:`StatefulCallback.state_options`). Checkpoints written before the key had options (the
bare class name) still load: :meth:`StatefulCallback.on_load_checkpoint` adopts that state when
no state is stored under the new key.
"""

from __future__ import annotations

from typing import Any

import lightning as L

__all__ = ["StatefulCallback"]


class StatefulCallback(L.Callback):
    """A callback whose ``state_key`` is its class name plus :meth:`state_options`."""

    def state_options(self) -> dict[str, Any]:
        """The options that tell two instances of the class apart."""
        return {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self.state_options())

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Runs before Lightning hands each callback its state (load_state_dict).
        states = checkpoint.get("callbacks")
        legacy = type(self).__qualname__
        if isinstance(states, dict) and self.state_key not in states and legacy in states:
            states[self.state_key] = states[legacy]
