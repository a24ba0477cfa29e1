"""The conftest of timm's model battery run over the zoo (loaded with ``-p battery_conftest``): importing attnzoo
registers the ``attnzoo_*`` models before timm's ``tests/test_models.py`` parametrizes over ``timm.list_models()``.
The battery is for image models; zoo models whose cfg has no (C, H, W) input (sequence models) are deselected."""

from timm.models import get_pretrained_cfg_value

import attnzoo  # noqa: F401


def _sequence_model(item) -> bool:
    name = getattr(item, "callspec", None) and item.callspec.params.get("model_name")
    return bool(name) and name.startswith("attnzoo_") and len(get_pretrained_cfg_value(name, "input_size") or ()) != 3


def pytest_collection_modifyitems(config, items):
    dropped = [item for item in items if _sequence_model(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not _sequence_model(item)]
