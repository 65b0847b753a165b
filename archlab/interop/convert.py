"""``archlab convert SRC DST``: between Hugging Face folders and archlab folders, either way; a GGUF file to archlab.

The source's ``config.json`` decides the direction: an archlab config names its ``class``; a Hugging
Face one names its ``model_type``. Both kinds of folder hold safetensors only. The tokenizer goes along:
``tokenizer.json`` (archlab reads Hugging Face's as its own; a Hugging Face folder gets it only when it is
in Hugging Face's format, not archlab's byte or char kinds), all in the one atomic write of ``dst``.
(A run folder, the resolution generate and eval use: ``archlab.train.run.convert_run``.)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from archlab.data.tokenizers import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, HFTokenizer, load_tokenizer
from archlab.errors import CheckpointError, ConfigError, DataError
from archlab.interop.bert import load_bert, save_bert
from archlab.interop.gguf import GGUFFile, gguf_tokenizer, load_gguf
from archlab.interop.gpt2 import load_gpt2, save_gpt2
from archlab.interop.io import CONFIG_FILE, atomic_dir, check_not_under_file, load_model, read_json, save_model
from archlab.interop.llama import load_llama, save_llama
from archlab.interop.rwkv import load_rwkv, save_rwkv
from archlab.interop.vit import load_vit, save_vit
from archlab.models.bert import BertForPreTraining, BertForSequenceClassification, BertModel
from archlab.models.gpt import GPT
from archlab.models.llama import Llama
from archlab.models.rwkv import RWKV
from archlab.models.vit import ViT
from archlab.nn.lora import lora_layers, unload_lora
from archlab.quant import quantize as quantize_layers, quantized_layers


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


def convert(src: str | Path, dst: str | Path, *, tokenizer_dir: str | Path | None = None,
            quantize: str | None = None) -> str:  # fmt: skip
    """Convert the model folder ``src`` into ``dst`` (written atomically) with the ``tokenizer.json`` of
    ``tokenizer_dir`` (default: ``src``'s, when it has one); returns e.g. ``"gpt2 -> archlab, with tokenizer.json"``
    (no tokenizer: ``"gpt2 -> archlab"``). ``quantize`` (one of :data:`archlab.quant.MODES`): the model's linear
    layers quantized (:func:`archlab.quant.quantize`'s defaults; a GGUF file's Q4_0/Q4_1 blocks and Q8_0 head as
    stored, :func:`archlab.interop.gguf.load_gguf`) and written as an archlab folder whatever ``src`` is (an archlab
    one too: ``archlab -> archlab``), which holds the quantized model (:func:`archlab.interop.io.save_model`)."""
    from archlab.quant import MODES

    src, dst = Path(src), Path(dst)
    if quantize is not None and quantize not in MODES:
        raise ConfigError(f"quantize={quantize!r} must be one of {MODES} or None (float weights)")
    check_destination(dst)
    if src.is_file() and src.suffix.lower() == ".gguf":
        return _convert_gguf(src, dst, quantize)
    if not src.is_dir():
        raise CheckpointError(
            f"{src} is not a folder (expected {CONFIG_FILE} and model.safetensors inside) nor a .gguf file"
        )
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"source and destination are the same folder: {src}")
    tokenizer = Path(tokenizer_dir if tokenizer_dir is not None else src) / TOKENIZER_FILE
    data = read_json(src / CONFIG_FILE)
    if "class" in data:
        model = load_model(src)
        if lora_layers(model):  # a LoRA run's checkpoint: Hugging Face gets the adapters merged into the weights
            unload_lora(model)
        if quantize is not None:  # archlab -> archlab, quantized (a fine-tuned model, say)
            quantize_layers(model, quantize)
            carried = tokenizer if tokenizer.is_file() else None
            _write(dst, lambda folder: save_model(model, folder), carried)
            return "archlab -> archlab" + _quantized_note(model, quantize) + _tokenizer_note(tokenizer, carried)
        if quantized_layers(model):
            raise CheckpointError(f"{src} holds a quantized model ({model.quant_report.mode}); a Hugging Face folder "
                                  "holds float weights: convert the float model")  # fmt: skip
        for name, fmt in HF_FORMATS.items():
            if isinstance(model, fmt.model_types):
                carried = tokenizer if tokenizer.is_file() and _is_hf_tokenizer(tokenizer) else None
                _write(dst, lambda folder: fmt.save(model, folder), carried)
                return f"archlab -> {name}" + _tokenizer_note(tokenizer, carried)
        raise CheckpointError(
            f"{src} holds a {type(model).__name__}, which has no Hugging Face format here "
            f"(convertible: {', '.join(c.__name__ for f in HF_FORMATS.values() for c in f.model_types)})"
        )
    model_type = data.get("model_type")
    if model_type in HF_FORMATS:
        model = HF_FORMATS[model_type].load(src)
        carried = tokenizer if tokenizer.is_file() else None
        if quantize is not None:
            quantize_layers(model, quantize)
        _write(dst, lambda folder: save_model(model, folder), carried)
        return f"{model_type} -> archlab" + _quantized_note(model, quantize) + _tokenizer_note(tokenizer, carried)
    raise CheckpointError(
        f"{src / CONFIG_FILE} is neither an archlab config (no 'class' key) nor a supported Hugging Face one "
        f"(model_type={model_type!r}; supported: {', '.join(HF_FORMATS)})"
    )


def check_destination(dst: Path) -> None:
    """ConfigError, before any work, unless ``dst`` is new, an empty folder or a model folder (with a ``config.json``):
    it is replaced whole, so a file, a folder under a file, or a folder of other files (a run, a project) is refused
    rather than deleted."""
    check_not_under_file(dst, "DST", "the folder to write (new, empty, or a model folder)")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / CONFIG_FILE).is_file():
        raise ConfigError(f"DST {str(dst)!r} holds other files and no {CONFIG_FILE} (not a model folder); "
                          "convert replaces DST whole, so give a new or empty folder, or a model folder to "
                          "overwrite")  # fmt: skip


def _convert_gguf(src: Path, dst: Path, quantize: str | None = None) -> str:
    """A GGUF file -> an archlab folder, with the tokenizer (and chat template) its metadata describes; ``quantize``:
    the model :func:`load_gguf` quantizes (its blocks as stored where the mode takes them)."""
    file = GGUFFile(src)
    model = load_gguf(file, quantize=quantize)
    tokenizer = gguf_tokenizer(file) if "tokenizer.ggml.model" in file.metadata else None

    def save(folder: Path) -> None:
        save_model(model, folder)
        if tokenizer is not None:
            tokenizer.save(folder)

    _write(dst, save, None)
    return "gguf -> archlab" + _quantized_note(model, quantize) + (f", with {TOKENIZER_FILE}" if tokenizer else "")


def _quantized_note(model: nn.Module, quantize: str | None) -> str:
    """``", quantized: <the report's summary line>"`` where ``quantize`` was asked, else nothing."""
    return "" if quantize is None else f", quantized: {str(model.quant_report).splitlines()[-1]}"


def _write(dst: Path, save: Callable[[Path], None], tokenizer: Path | None) -> None:
    """``save(folder)`` (a family's writer, atomic by itself) and a copy of ``tokenizer``, as one atomic write of ``dst``."""
    with atomic_dir(dst) as tmp:
        staged = tmp / "model"
        save(staged)
        for f in staged.iterdir():
            os.replace(f, tmp / f.name)
        staged.rmdir()
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
            config = tokenizer.with_name(TOKENIZER_CONFIG_FILE)  # roles and chat template, when there are some
            if config.is_file():
                shutil.copyfile(config, tmp / TOKENIZER_CONFIG_FILE)


def _is_hf_tokenizer(path: Path) -> bool:
    """A Hugging Face ``tokenizer.json`` (``tokenizers``' format), not one of archlab's own kinds (byte, char)."""
    try:
        return isinstance(load_tokenizer(path), HFTokenizer)
    except DataError:
        return False


def _tokenizer_note(tokenizer: Path, carried: Path | None) -> str:
    if carried is not None:
        return f", with {TOKENIZER_FILE}"
    if tokenizer.is_file():
        return f"; {tokenizer} left out: an archlab byte/char tokenizer, which Hugging Face cannot read"
    return ""
