"""LightningModules, one task per file: image classification, object detection, character LM, time series."""

from attnzoo.train.tasks.base import TaskModule
from attnzoo.train.tasks.detection import DetectionTask
from attnzoo.train.tasks.image import ImageClassifier
from attnzoo.train.tasks.language import CharLanguageModel
from attnzoo.train.tasks.series import SeriesClassifier

__all__ = ["CharLanguageModel", "DetectionTask", "ImageClassifier", "SeriesClassifier", "TaskModule"]
