"""DetectionTask through the attnzoo CLI on tiny composed data: every detector fits, validates from its checkpoint
with the mAP metrics, tests, and predicts boxes (printed and drawn)."""

import pytest

from attnzoo.train.tasks import DetectionTask
from tests.train.helpers import FCOS_CONFIG, HAS_FMNIST, NEEDS_FMNIST_REASON, TINY_DETECTION_DATA, TINY_NAT, cli

DETECTORS = {
    "fcos": ("[1, 2]", "{fpn_channels: 32, extra_blocks: pool}"),
    "retinanet": ("[1, 2]", "{fpn_channels: 32}"),
    "faster_rcnn": ("[1, 2]", "{fpn_channels: 32}"),
    "detr": ("[2]", "{dim: 32, num_heads: 2, depth: 1, num_queries: 8}"),
}
MAP_KEYS = {"map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
            "mar_small", "mar_medium", "mar_large"}  # fmt: skip


@pytest.mark.skipif(not HAS_FMNIST, reason=NEEDS_FMNIST_REASON)
@pytest.mark.parametrize("arch", DETECTORS)
def test_detection_task_fit_validate_test_predict(arch, tmp_path):
    levels, options = DETECTORS[arch]
    args = ["--config", str(FCOS_CONFIG), *TINY_DETECTION_DATA, "--model.init_args.detector", arch,
            "--model.init_args.model_kwargs", f"{{out_indices: {levels}, {TINY_NAT}}}",
            "--model.init_args.detector_kwargs", options]  # fmt: skip
    fit = cli("fit", tmp_path, *args, "--trainer.max_epochs", "1")
    metrics = fit.trainer.callback_metrics
    assert fit.trainer.global_step == 2 and metrics["train_loss"].isfinite()
    assert {f"val_{k}" for k in MAP_KEYS} | {"val_loss"} <= set(metrics), sorted(metrics)
    assert 0 <= metrics["val_map_50"] <= 1 and metrics["val_loss"].isfinite()
    ckpt = fit.trainer.checkpoint_callback.last_model_path

    val = cli("validate", tmp_path, *args, "--ckpt_path", ckpt)
    assert val.trainer.callback_metrics["val_loss"] == pytest.approx(metrics["val_loss"].item(), rel=1e-4)
    terms = [k for k in val.trainer.callback_metrics if k.startswith("val_loss_")]
    assert len(terms) >= 2 and not any(k.startswith("val_loss_loss") for k in terms), terms
    # the whole detector from the run's checkpoint file (how a shipped detector is loaded, by name or file)
    weights = cli("validate", tmp_path, *args, "--model.init_args.detector_weights", ckpt)
    assert weights.trainer.callback_metrics["val_loss"] == pytest.approx(metrics["val_loss"].item(), rel=1e-4)
    test = cli("test", tmp_path, *args, "--ckpt_path", ckpt)
    assert {f"test_{k}" for k in MAP_KEYS} <= set(test.trainer.callback_metrics)

    boxes = tmp_path / "boxes"
    pred = cli("predict", tmp_path, *args, "--ckpt_path", ckpt, "--data.init_args.predict_limit", "3",
               "--model.init_args.predict_score_thresh", "0.0", "--predictions.boxes_dir", str(boxes))  # fmt: skip
    printer = next(c for c in pred.trainer.callbacks if type(c).__name__ == "PredictionPrinter")
    assert [line.split(": ")[0] for line in printer.lines] == ["test_0", "test_1", "test_2"]
    assert sorted(p.name for p in boxes.iterdir()) == [f"test_{i}.boxes.png" for i in range(3)]


def test_detection_task_bad_arguments():
    info = {"class_names": ["a", "b"], "in_chans": 1}
    with pytest.raises(ValueError, match=r"detector='ssd'; accepted values: \['fcos', 'retinanet', 'faster_rcnn', "
                                         r"'detr'\]"):  # fmt: skip
        DetectionTask("attnzoo_nat_mini", detector="ssd", data_info=info)
    with pytest.raises(ValueError, match=r"predict_score_thresh=1.5 must be in \[0, 1\]"):
        DetectionTask("attnzoo_nat_mini", predict_score_thresh=1.5, data_info=info)
    with pytest.raises(ValueError, match=r"data_info lacks \['in_chans'\]"):
        DetectionTask("attnzoo_nat_mini", data_info={"class_names": ["a"]})
    with pytest.raises(FileNotFoundError, match=r"weights file nowhere\.safetensors does not exist"):
        DetectionTask("attnzoo_nat_mini", data_info=info, detector_weights="nowhere.safetensors")
