"""Bad input through the CLI and the task/data classes: errors name the culprit and what would be accepted."""

import pytest
import torch

from attnzoo.train.backbone import create_backbone
from attnzoo.train.data.image_files import write_image_file
from attnzoo.train.export import load_task
from attnzoo.zoo.weight_files import load_weights
from tests.train.helpers import HAS_FMNIST, NEEDS_FMNIST_REASON, TINY_VIT, VIT_CONFIG, cli

needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason=NEEDS_FMNIST_REASON)


def _predict(root, ckpt, files):
    return cli("predict", root, "--config", str(VIT_CONFIG), *TINY_VIT, "--ckpt_path", str(ckpt),
               "--data.init_args.predict_files", str([str(f) for f in files]))  # fmt: skip


@needs_fmnist
def test_corrupt_image_names_the_file(tiny_run, tmp_path):
    ckpt, _ = tiny_run
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(40)))  # a PNG signature, then garbage
    with pytest.raises(ValueError, match=r"cannot read image file .*broken\.png"):
        _predict(tmp_path, ckpt, [bad])


@needs_fmnist
def test_wrong_size_image_names_file_and_sizes(tiny_run, tmp_path):
    ckpt, _ = tiny_run
    big = tmp_path / "big.png"
    write_image_file(big, torch.zeros(1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"big\.png is \(1, 32, 32\).*the data is \(1, 28, 28\)"):
        _predict(tmp_path, ckpt, [big])


def test_unknown_model_lists_close_names():
    with pytest.raises(ValueError, match=r"model_name='attnzoo_nat_mni' is not a registered.*attnzoo_nat_mini"):
        create_backbone("attnzoo_nat_mni")


@needs_fmnist
def test_unknown_model_through_the_cli(tmp_path):
    with pytest.raises(ValueError, match=r"'attnzoo_vit_tiny_patch4_82'.*close names: attnzoo_vit_tiny_patch4_28"):
        cli("fit", tmp_path, "--config", str(VIT_CONFIG), "--model.init_args.model_name", "attnzoo_vit_tiny_patch4_82")


@needs_fmnist
def test_weights_of_another_architecture_name_the_keys(tiny_run, tmp_path):
    ckpt, _ = tiny_run
    nat = create_backbone("attnzoo_nat_mini", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"do not fit the model Nat: \d+ missing keys \[.*\]; \d+ unexpected keys "
                                         r"\[.*blocks\.0\.attn\.qkv\.weight"):  # fmt: skip
        load_weights(nat, ckpt)
    # the same through the CLI's weights= option
    with pytest.raises(ValueError, match=r"missing keys .*unexpected keys"):
        cli("fit", tmp_path, "--config", str(VIT_CONFIG), "--model.init_args.model_name", "attnzoo_nat_mini",
            "--model.init_args.model_kwargs", "{}", "--model.init_args.weights", str(ckpt))  # fmt: skip


def test_weights_with_other_shapes_name_them(tmp_path):
    a = create_backbone("attnzoo_vit_tiny_patch4_28", num_classes=10, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    b = create_backbone("attnzoo_vit_tiny_patch4_28", num_classes=7, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    torch.save(a.state_dict(), tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"2 shape mismatches \[head\.weight: \(10, 32\) vs \(7, 32\), head\.bias"):
        load_weights(b, tmp_path / "a.pth")


@needs_fmnist
def test_checkpoint_of_other_data_is_refused(tiny_run, tmp_path):
    ckpt, _ = tiny_run
    for cls in ("Bag", "Coat"):
        (tmp_path / "folder" / "val" / cls).mkdir(parents=True)
        write_image_file(tmp_path / "folder" / "val" / cls / "0.png", torch.zeros(1, 28, 28, dtype=torch.uint8))
    (tmp_path / "folder" / "train").symlink_to(tmp_path / "folder" / "val")
    with pytest.raises(ValueError, match=r"trained on other data: data_info differs in \['class_names', 'mean'"):
        cli("validate", tmp_path, "--config", str(VIT_CONFIG), *TINY_VIT, "--ckpt_path", str(ckpt),
            "--data", "ImageFolderDataModule", "--data.init_args.root", str(tmp_path / "folder"))  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.label_smothing", "0.1"], "label_smothing"),
        (["--trainer.max_epoch", "3"], "max_epoch"),
        (["--model.init_args.optimizer.learning_rate", "0.1"], "learning_rate"),
    ],
)
def test_config_typo_is_a_parser_error_not_a_traceback(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("fit", tmp_path, "--config", str(VIT_CONFIG), *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_config_file_typo(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(VIT_CONFIG.read_text().replace("batch_size:", "batchsize:"))
    with pytest.raises(SystemExit):
        cli("fit", tmp_path, "--config", str(config))
    err = capsys.readouterr().err
    assert "batchsize" in err and "Traceback" not in err


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*missing\.ckpt does not exist"):
        load_task(tmp_path / "missing.ckpt")


def test_checkpoint_without_task_class(tmp_path):
    torch.save({"state_dict": {}, "hyper_parameters": {"model_name": "x"}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"names the task class None, which is not an imported TaskModule"):
        load_task(tmp_path / "plain.ckpt")
