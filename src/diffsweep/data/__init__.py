"""Data: sources (digits, image folders, MNIST/Fashion-MNIST, CIFAR-10, VAE latents of any of
them) behind the one ImageDataModule."""

from diffsweep.data.base import ImageSource, TensorImageDataset, collate
from diffsweep.data.cifar10 import Cifar10Source
from diffsweep.data.datamodule import ImageDataModule
from diffsweep.data.digits import DigitsSource
from diffsweep.data.folder import ImageFolderSource
from diffsweep.data.latents import LatentSource
from diffsweep.data.mnist import FashionMNISTSource, MNISTSource
from diffsweep.data.sampling import EpochIndex, GlobalBatchSampler, ResumableDataLoader

__all__ = [
    "Cifar10Source",
    "DigitsSource",
    "EpochIndex",
    "FashionMNISTSource",
    "GlobalBatchSampler",
    "ImageDataModule",
    "ImageFolderSource",
    "ImageSource",
    "LatentSource",
    "MNISTSource",
    "ResumableDataLoader",
    "TensorImageDataset",
    "collate",
]
