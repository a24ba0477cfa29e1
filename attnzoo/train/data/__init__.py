"""Data: the embedded default data sets (design §3) and the LightningDataModules over them and over user data.

Nothing here touches the network unless asked to. The DataModules (and Lightning) are imported on first use.
"""

from attnzoo.train.data.fashion_mnist import FASHION_MNIST_CLASSES, IdxFormatError, load_fashion_mnist

_DATAMODULES = {
    "FashionMNISTDataModule": "images",
    "ImageFolderDataModule": "images",
    "FashionDetectionDataModule": "detection",
    "CocoDetectionDataModule": "detection",
    "TextDataModule": "text",
    "SeriesDataModule": "series",
}

__all__ = ["FASHION_MNIST_CLASSES", "IdxFormatError", "load_fashion_mnist", *_DATAMODULES]


def __getattr__(name: str):
    if name in _DATAMODULES:
        import importlib

        return getattr(importlib.import_module(f"attnzoo.train.data.{_DATAMODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
