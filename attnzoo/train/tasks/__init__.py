"""LightningModules, one task per file: image classification, character LM, time series."""

from attnzoo.train.tasks.base import TaskModule
from attnzoo.train.tasks.image import ImageClassifier
from attnzoo.train.tasks.language import CharLanguageModel
from attnzoo.train.tasks.series import SeriesClassifier

__all__ = ["CharLanguageModel", "ImageClassifier", "SeriesClassifier", "TaskModule"]
