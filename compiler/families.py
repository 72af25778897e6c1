"""Model families fastertrt exports, keyed by Hugging Face `model_type`.

A family says whether the model is an encoder (one graph: ids -> hidden states)
or a decoder (prefill + decode-step graphs with an explicit KV cache), and how
its inputs look. Only families whose export is verified by the tests are here.
"""

from dataclasses import dataclass

from fastertrt.errors import UnknownModelFamilyError


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # "encoder" or "decoder"
    # Positions some encoders reserve below the first real position (RoBERTa
    # counts from padding_idx + 1), so the usable length is smaller.
    position_offset: int = 0


FAMILIES = {
    "bert": Family("bert", "encoder"),
    "roberta": Family("roberta", "encoder", position_offset=2),
    "distilbert": Family("distilbert", "encoder"),
    "gpt2": Family("gpt2", "decoder"),
    "llama": Family("llama", "decoder"),
}


def family_for(model_type: str, where: str = "") -> Family:
    fam = FAMILIES.get(model_type)
    if fam is None:
        known = ", ".join(sorted(FAMILIES))
        src = f" in {where}" if where else ""
        raise UnknownModelFamilyError(
            f"model_type {model_type!r}{src} is not a family fastertrt exports; "
            f"known families: {known}. Use one of those architectures, or export a "
            f"plain nn.Module with fastertrt.compiler.compile_module(module, example_inputs, ...)."
        )
    return fam
