"""The tasks on their own: parameter groups and schedule, auxiliary losses, LM metrics and sampling, series heads."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnzoo.train.data.text import TextDataModule
from attnzoo.train.optim import build_optimization, check_optimizer_settings
from attnzoo.train.tasks import CharLanguageModel, ImageClassifier, SeriesClassifier
from tests.train.helpers import rel_err

# The steps run here outside a Trainer, where self.log() only warns.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

IMAGE_INFO = {"class_names": [f"c{i}" for i in range(10)], "in_chans": 1, "img_size": [28, 28],
              "mean": [0.5], "std": [0.25]}  # fmt: skip
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
VOCAB = "\n abcdefghijklmnopqrstuvwxyz.'"


def _vit(**kwargs) -> ImageClassifier:
    return ImageClassifier("attnzoo_vit_tiny_patch4_28", data_info=IMAGE_INFO, model_kwargs=TINY_VIT, **kwargs)


def _groups_by_name(task, settings, total=100):
    opt = build_optimization(task.model, check_optimizer_settings(settings), total)["optimizer"]
    ids = {id(p): n for n, p in task.model.named_parameters()}
    return opt, [({ids[id(p)] for p in g["params"]}, g) for g in opt.param_groups]  # (names, group) per group


def test_weight_decay_groups_follow_timm():
    task = _vit()
    _, groups = _groups_by_name(task, {"weight_decay": 0.1})
    decayed = set().union(*(names for names, g in groups if g["weight_decay"] > 0))
    skipped = set().union(*(names for names, g in groups if g["weight_decay"] == 0))
    assert {"cls_token", "pos_embed"} <= task.model.no_weight_decay() <= skipped
    for name, p in task.model.named_parameters():
        assert (name in decayed) == (p.ndim > 1 and name not in task.model.no_weight_decay()), name
    assert all(g["weight_decay"] == 0.1 for names, g in groups if names & decayed)


def test_layer_decay_uses_group_matcher():
    task = _vit()
    _, groups = _groups_by_name(task, {"layer_decay": 0.5})
    scales = {round(g["lr_scale"], 6) for _, g in groups}
    # stem, 2 blocks, head: lr scales 0.5^3 ... 1 from timm's param_groups_layer_decay over group_matcher
    assert scales == {0.125, 0.25, 0.5, 1.0}
    head = next(g for names, g in groups if "head.weight" in names)
    stem = next(g for names, g in groups if "patch_embed.proj.weight" in names)
    assert head["lr_scale"] == 1.0 and stem["lr_scale"] == 0.125


def test_warmup_then_cosine():
    task = _vit()
    settings = check_optimizer_settings({"lr": 1e-2, "warmup": 0.1, "min_lr": 1e-4})
    conf = build_optimization(task.model, settings, total_steps=100)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for step in range(101):
        sched.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-4)  # warm-up starts at lr / 100
    assert lrs[5] == pytest.approx(1e-4 + 5 * (1e-2 - 1e-4) / 10)  # linear warm-up over 10 steps
    for t in (10, 40, 75):
        assert lrs[t] == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4) * (1 + math.cos(math.pi * t / 100)))
    assert lrs[100] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "adamx"}, r"optimizer.name='adamx' is not a timm optimizer; accepted values: \[.*'adamw'"),
        ({"scheduler": "linear"}, r"optimizer.scheduler='linear'; accepted values: \['cosine'"),
        ({"lr": 0.0}, r"optimizer.lr=0.0 must be > 0"),
        ({"warmup": 1.5}, r"optimizer.warmup=1.5 must be a fraction of the steps in \[0, 1\)"),
        ({"layer_decay": 2.0}, r"optimizer.layer_decay=2.0 must be in \(0, 1\] or None"),
    ],
)
def test_bad_optimizer_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        _vit(optimizer=settings)


def test_task_argument_errors():
    with pytest.raises(ValueError, match=r"ImageClassifier needs data_info"):
        ImageClassifier("attnzoo_vit_tiny_patch4_28")
    with pytest.raises(ValueError, match=r"data_info lacks \['in_chans'\] for ImageClassifier"):
        ImageClassifier("attnzoo_vit_tiny_patch4_28", data_info={"class_names": ["a", "b"]})
    with pytest.raises(ValueError, match=r"model_kwargs sets \['num_classes'\], which the task derives"):
        ImageClassifier("attnzoo_vit_tiny_patch4_28", data_info=IMAGE_INFO, model_kwargs={"num_classes": 3})
    with pytest.raises(ValueError, match=r"label_smoothing=1.0 must be in \[0, 1\)"):
        _vit(label_smoothing=1.0)


def test_mixup_loss_is_soft_cross_entropy():
    torch.manual_seed(0)
    task = _vit(mixup_alpha=0.8, label_smoothing=0.1)
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    np.random.seed(3)
    loss = task.shared_step((images.clone(), labels), "train")
    np.random.seed(3)  # the same mixing draw
    mixed, soft = task.mixup(images.clone(), labels)
    ref = -(soft.double() * F.log_softmax(task(mixed).double(), -1)).sum(-1).mean()
    assert soft.shape == (8, 10) and soft.min() > 0  # mixed and smoothed
    assert rel_err(loss, ref) <= 1e-5


SERIES_INFO = {"task": "classification", "in_chans": 2, "length": 16, "class_names": ["a", "b", "c"]}


def test_auxiliary_loss_is_added_and_logged():
    task = SeriesClassifier("test_tiny_series_encoder", data_info=SERIES_INFO, model_kwargs={"aux_weight": 0.5})
    x, y = torch.randn(4, 16, 2), torch.randint(0, 3, (4,))
    loss = task.training_step((x, y), 0)
    logits = task.model(x)
    ref = F.cross_entropy(logits.double(), y) + 0.5 * task.model.features.double().pow(2).mean()
    assert rel_err(loss, ref) <= 1e-6
    loss.backward()  # the auxiliary term reaches the parameters
    assert task.model.embed.weight.grad.abs().sum() > 0
    no_aux = SeriesClassifier("test_tiny_series_encoder", data_info=SERIES_INFO)
    assert no_aux.auxiliary_loss() is None


def test_moh_load_balance_loss_of_a_vision_model_is_added():
    # timm vision models have no auxiliary_loss(); the task collects what their MoH routers recorded
    task = ImageClassifier("attnzoo_vit_mini_moh", data_info=IMAGE_INFO, model_kwargs={"depth": 2}).train()
    images, labels = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    torch.manual_seed(0)
    loss = task.training_step((images, labels), 0)
    torch.manual_seed(0)
    plain = F.cross_entropy(task(images), labels)
    balance = [m.aux_loss for m in task.model.modules() if type(m).__name__ == "MoHRouter"]
    assert len(balance) == 2 and all(b is not None and b > 0 for b in balance)
    assert rel_err(loss, plain + sum(balance)) <= 1e-6
    assert task.auxiliary_loss() is not None and task.auxiliary_loss() is None  # collected once, then cleared


def test_series_forecasting_head_and_units():
    info = {"task": "forecasting", "in_chans": 2, "length": 16, "horizon": 3, "mean": [10.0, -1.0], "std": [2.0, 0.5]}
    task = SeriesClassifier("test_tiny_series_encoder", data_info=info).eval()
    x = torch.randn(5, 16, 2)
    out = task(x)
    assert out.shape == (5, 3, 2)
    forecast = task.predict_step((x, None), 0)["forecast"]
    torch.testing.assert_close(forecast, out * torch.tensor([2.0, 0.5]) + torch.tensor([10.0, -1.0]))
    loss = task.shared_step((x, torch.zeros(5, 3, 2)), "val")
    assert rel_err(loss, out.double().pow(2).mean()) <= 1e-6


def _lm(**kwargs) -> CharLanguageModel:
    return CharLanguageModel("test_tiny_char_lm", data_info={"vocab": VOCAB, "block_size": 8}, **kwargs)


def test_bits_per_char_and_perplexity(tmp_path):
    from lightning.pytorch import Trainer

    torch.manual_seed(0)
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 30)
    data = TextDataModule(corpus=[str(tmp_path / "a.txt")], block_size=8, batch_size=3)
    task = CharLanguageModel("test_tiny_char_lm", data_info=data.data_info)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    (metrics,) = trainer.validate(task, datamodule=data, verbose=False)
    data.setup("validate")
    batches = list(data.val_dataloader())
    assert len(batches) >= 2 and len(batches[-1][0]) < 3  # the last, smaller batch must weigh less
    nats = sum(F.cross_entropy(task(x).double().flatten(0, 1), y.flatten(), reduction="sum") for x, y in batches)
    mean = nats / sum(y.numel() for _, y in batches)
    assert metrics["val_bpc"] == pytest.approx(mean.item() / math.log(2), rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(mean.item()), rel=1e-5)


def test_generate():
    task = _lm()
    torch.manual_seed(1)
    a = task.generate("the ", 20, temperature=0.8, top_k=5)
    torch.manual_seed(1)
    b = task.generate("the ", 20, temperature=0.8, top_k=5)
    assert a == b and len(a) == 20 and set(a) <= set(VOCAB)
    long_prompt = "abc " * 10  # longer than block_size: the model sees the last 8 characters
    assert len(task.generate(long_prompt, 3)) == 3
    greedy = task.generate("a", 1, top_k=1)
    logits = task(task.encode("a")[None])[0, -1]
    assert greedy == VOCAB[logits.argmax()]
    out = _lm(predict_chars=5).predict_step(["ab", "c"], 0)
    assert out["prompts"] == ["ab", "c"] and [len(t) for t in out["texts"]] == [5, 5]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: t.generate("héllo", 3), r"characters outside the model's vocabulary: \['é'\]"),
        (lambda t: t.generate("", 3), r"prompt='' is empty"),
        (lambda t: t.generate("a", 3, temperature=0), r"temperature=0 must be > 0"),
        (lambda t: t.generate("a", 3, top_k=99), r"top_k=99 must be in \[1, 30\]"),
    ],
)
def test_generate_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(_lm())
