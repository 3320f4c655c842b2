import logging
import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
for _name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tok():
    from lightning_bdvax.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def records():
    from lightning_bdvax.builtin_data import builtin_instructions

    return builtin_instructions(1500, seed=3)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama saved with save_pretrained (safetensors) + tokenizer: a suspicious-model input.
    Shared by the whole session: tests only read it (several check it is left unchanged)."""
    from lightning_bdvax.models import save_model
    from lightning_bdvax.tiny import tiny_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("input") / "suspicious"
    save_model(tiny_model("llama"), tiny_tokenizer(), d)
    return d


@pytest.fixture
def llama():
    from lightning_bdvax.tiny import tiny_model

    return tiny_model("llama")


# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
# oversubscription makes them tens of times slower.
import torch  # noqa: E402

torch.set_num_threads(1)
