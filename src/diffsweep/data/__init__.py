"""Image data: sources (digits, image folders, MNIST/Fashion-MNIST) and the ImageDataModule.

The VAE latent cache lives in ``diffsweep.data.latents`` (imported explicitly, not here).
"""

from diffsweep.data.base import ImageSource, TensorImageDataset
from diffsweep.data.datamodule import ImageDataModule
from diffsweep.data.digits import DigitsSource
from diffsweep.data.folder import ImageFolderSource
from diffsweep.data.mnist import FashionMNISTSource, MNISTSource

__all__ = [
    "DigitsSource",
    "FashionMNISTSource",
    "ImageDataModule",
    "ImageFolderSource",
    "ImageSource",
    "MNISTSource",
    "TensorImageDataset",
]
