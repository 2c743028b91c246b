import pytest
import torch

from diffsweep.nets.unet import UNet, sinusoidal_embedding


def test_ddpm_cifar10_configuration_has_35_7m_parameters():
    net = UNet(in_channels=3, resolution=32, base_channels=128, channel_mults=(1, 2, 2, 2),
               num_res_blocks=2, attention_resolutions=(16,), dropout=0.1)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(35.7e6, rel=0.002)


@pytest.mark.parametrize("channels,resolution", [(1, 16), (3, 32), (4, 8)])
def test_output_shape_matches_input(channels, resolution):
    net = UNet(in_channels=channels, resolution=resolution, base_channels=16,
               channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(resolution // 2,))
    x = torch.randn(2, channels, resolution, resolution)
    assert net(x, torch.tensor([0.0, 500.0])).shape == x.shape


def _randomise(net: torch.nn.Module) -> None:
    """Replace the zero init of output layers so the output depends on every input."""
    torch.manual_seed(0)
    for name, p in net.named_parameters():
        if "norm" in name:
            continue
        torch.nn.init.normal_(p, std=0.2)


def test_output_depends_on_noise_level():
    net = UNet(in_channels=1, resolution=8, base_channels=16, channel_mults=(1, 2),
               num_res_blocks=1, attention_resolutions=())
    _randomise(net)
    x = torch.randn(1, 1, 8, 8)
    difference = (net(x, torch.tensor([1.0])) - net(x, torch.tensor([900.0]))).abs().max()
    assert difference > 1e-2


def test_class_conditioning_uses_labels_and_null_label():
    net = UNet(in_channels=1, resolution=8, base_channels=16, channel_mults=(1, 2),
               num_res_blocks=1, attention_resolutions=(), num_classes=10)
    _randomise(net)
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 10.0])
    out_a = net(x, c, torch.tensor([1, 1]))
    out_b = net(x, c, torch.tensor([2, 2]))
    out_null = net(x, c)
    assert not torch.allclose(out_a, out_b)
    assert torch.allclose(out_null, net(x, c, torch.tensor([10, 10])))


def test_resolution_not_divisible_by_downsampling_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by 4"):
        UNet(in_channels=1, resolution=18, channel_mults=(1, 2, 2))


def test_sinusoidal_embedding_shape_and_range():
    emb = sinusoidal_embedding(torch.tensor([0.0, 1.0, 999.0]), 31)
    assert emb.shape == (3, 31)
    assert emb.abs().max() <= 1.0
