"""The pre hook sees final (clipped) gradients; the post hook sees updated weights."""

from __future__ import annotations

import lightning as L
import torch

from app.callbacks.step_hooks import OptimizerStepHooks


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.events: list[str] = []

    def training_step(self, batch, batch_idx):
        self.events.append("training_step")
        x = torch.full((8, 4), 10.0)
        return (self.layer(x) ** 2).mean()

    def on_before_optimizer_step(self, optimizer) -> None:
        self.events.append("on_before_optimizer_step")

    def train_dataloader(self):
        return torch.utils.data.DataLoader(list(range(16)), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Recorder(L.Callback):
    def on_train_start(self, trainer, module) -> None:
        def pre() -> None:
            module.events.append("pre")
            module.grad_norms.append(float(module.layer.weight.grad.norm()))
            module.before.append(module.layer.weight.detach().clone())

        def post() -> None:
            module.events.append("post")
            module.after.append(module.layer.weight.detach().clone())

        module.grad_norms, module.before, module.after = [], [], []
        self.hooks = OptimizerStepHooks(pre, post)
        self.hooks.attach(trainer.optimizers)

    def on_train_end(self, trainer, module) -> None:
        self.hooks.detach()


def test_pre_after_clipping_post_after_step(tmp_path) -> None:
    module = Tiny()
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, gradient_clip_val=0.5,
                        gradient_clip_algorithm="norm", callbacks=[Recorder()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module)
    # once per real step (3), after the two accumulated micro-batches
    assert module.events.count("pre") == module.events.count("post") == 3
    first = module.events[: module.events.index("post") + 1]
    assert first == ["training_step", "training_step", "on_before_optimizer_step", "pre", "post"]
    # gradient clipping has already happened when pre runs (total norm clipped to 0.5)
    assert all(n <= 0.5 + 1e-5 for n in module.grad_norms)
    for before, after in zip(module.before, module.after):
        assert not torch.equal(before, after)
