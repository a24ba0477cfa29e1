"""Embedded default data sets (design §3); nothing here touches the network unless asked to."""

from attnzoo.train.data.fashion_mnist import FASHION_MNIST_CLASSES, IdxFormatError, load_fashion_mnist

__all__ = ["FASHION_MNIST_CLASSES", "IdxFormatError", "load_fashion_mnist"]
