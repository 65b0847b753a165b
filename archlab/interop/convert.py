"""``archlab convert SRC DST``: between Hugging Face folders and archlab folders, either way.

The source's ``config.json`` decides the direction: an archlab config names its ``class``; a Hugging
Face one names its ``model_type``. Both kinds of folder hold safetensors only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from archlab.errors import CheckpointError
from archlab.interop.bert import load_bert, save_bert
from archlab.interop.gpt2 import load_gpt2, save_gpt2
from archlab.interop.io import CONFIG_FILE, load_model, read_json, save_model
from archlab.interop.llama import load_llama, save_llama
from archlab.interop.rwkv import load_rwkv, save_rwkv
from archlab.interop.vit import load_vit, save_vit
from archlab.models.bert import BertForPreTraining, BertForSequenceClassification, BertModel
from archlab.models.gpt import GPT
from archlab.models.llama import Llama
from archlab.models.rwkv import RWKV
from archlab.models.vit import ViT


@dataclass(frozen=True)
class HFFormat:
    model_types: tuple[type[nn.Module], ...]  # archlab classes that convert to this format
    load: Callable[[Path], nn.Module]
    save: Callable[[nn.Module, Path], None]


HF_FORMATS: dict[str, HFFormat] = {
    "gpt2": HFFormat((GPT,), load_gpt2, save_gpt2),
    "llama": HFFormat((Llama,), load_llama, save_llama),
    "bert": HFFormat((BertModel, BertForPreTraining, BertForSequenceClassification), load_bert, save_bert),
    "vit": HFFormat((ViT,), load_vit, save_vit),
    "rwkv": HFFormat((RWKV,), load_rwkv, save_rwkv),
}


def convert(src: str | Path, dst: str | Path) -> str:
    """Convert the model folder ``src`` into ``dst`` (written atomically); returns e.g. ``"gpt2 -> archlab"``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder (expected {CONFIG_FILE} and model.safetensors inside)")
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"source and destination are the same folder: {src}")
    data = read_json(src / CONFIG_FILE)
    if "class" in data:
        model = load_model(src)
        for name, fmt in HF_FORMATS.items():
            if isinstance(model, fmt.model_types):
                fmt.save(model, dst)
                return f"archlab -> {name}"
        raise CheckpointError(
            f"{src} holds a {type(model).__name__}, which has no Hugging Face format here "
            f"(convertible: {', '.join(c.__name__ for f in HF_FORMATS.values() for c in f.model_types)})"
        )
    model_type = data.get("model_type")
    if model_type in HF_FORMATS:
        save_model(HF_FORMATS[model_type].load(src), dst)
        return f"{model_type} -> archlab"
    raise CheckpointError(
        f"{src / CONFIG_FILE} is neither an archlab config (no 'class' key) nor a supported Hugging Face one "
        f"(model_type={model_type!r}; supported: {', '.join(HF_FORMATS)})"
    )
