import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffsweep.callbacks.ema import EMA, ema_decay


def test_decay_warmup_rises_to_max():
    decays = [ema_decay(step, max_decay=0.999, power=2 / 3) for step in range(0, 100_000, 1000)]
    assert decays[0] == 0.0
    assert all(a <= b for a, b in zip(decays, decays[1:]))
    assert decays[-1] == 0.999
    assert ema_decay(10, max_decay=0.9999, power=1.0, inv_gamma=1.0) == pytest.approx(1 - 1 / 11)


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.seen.append({k: v.detach().clone() for k, v in self.layer.state_dict().items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ema_matches_hand_computed_average_and_checkpoint_holds_both(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 3), torch.randn(40, 1))
    module = Regression()
    ema = EMA(max_decay=0.9, power=1.0, inv_gamma=1.0)
    trainer = L.Trainer(max_steps=10, callbacks=[ema], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        enable_checkpointing=False)
    trainer.fit(module, DataLoader(data, batch_size=4))
    # Hand-computed EMA: first update copies, then decay(step) = min(0.9, 1 - 1/(1+step)).
    expected = dict(module.seen[0])
    for step, weights in enumerate(module.seen[1:], start=1):
        decay = ema_decay(step, max_decay=0.9, power=1.0, inv_gamma=1.0)
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in weights}
    raw = module.seen[-1]
    # After training, Lightning copies the average into the module.
    for key, value in module.layer.state_dict().items():
        torch.testing.assert_close(value, expected[key])
        assert not torch.allclose(value, raw[key])
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert "current_model_state" in checkpoint


def test_start_step_tracks_raw_weights_before_averaging():
    ema = EMA(max_decay=0.99, start_step=5)
    assert ema.should_update(step_idx=2) and ema.current_decay() == 0.0
    assert ema.should_update(step_idx=50) and 0.0 < ema.current_decay() <= 0.99
    assert not ema.should_update(epoch_idx=1)
