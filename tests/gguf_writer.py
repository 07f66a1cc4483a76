"""Write a tiny HF model as a float32 GGUF file with the `gguf` package's writer, laid out
as llama.cpp's converter lays it out: the inverse of what transformers does when it
reads one (`transformers.modeling_gguf_pytorch_utils`). Tensor names come from
transformers' own GGUF-to-HF name map, config keys from its `GGUF_CONFIG_MAPPING`, and
the tensor transforms it undoes are redone here: Llama's q/k rows permuted for rotary
pairs, GPT-2's Conv1D weights transposed, Gemma's norm weights stored as 1 + w. The
byte-level test tokenizer goes in as a "gpt2" BPE vocabulary. The round trip (write,
read back with transformers, compare every tensor) is what the tests check first.
"""

from pathlib import Path

import gguf
import numpy as np
from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
)

# HF model_type -> GGUF architecture where they differ (llama.cpp writes Mistral as Llama,
# with "mistral" in the model's name, which is how transformers tells them apart)
GGUF_ARCH = {"gemma3_text": "gemma3", "mistral": "llama"}
GPT2_TRANSPOSED = ("attn_qkv.weight", "ffn_down.weight", "ffn_up.weight", "attn_output.weight")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``, which transformers' reader reverses."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _stored(arch: str, name: str, w: np.ndarray, config) -> np.ndarray:
    if arch == "llama" and ".attn_q." in name:
        return _permute(w, config.num_attention_heads)
    if arch == "llama" and ".attn_k." in name:
        return _permute(w, config.num_key_value_heads)
    if arch == "gpt2" and name.endswith(GPT2_TRANSPOSED):
        return np.ascontiguousarray(w.T)
    if arch in ("gemma2", "gemma3") and "norm.weight" in name:
        return w + 1
    return w


def _add_value(writer: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)


def write_gguf(model, tokenizer, path: Path) -> Path:
    config = model.config
    arch = GGUF_ARCH.get(config.model_type, config.model_type)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{config.model_type}")
    for key, attr in GGUF_CONFIG_MAPPING[arch].items():
        if attr is not None and getattr(config, attr, None) is not None:
            _add_value(writer, f"{arch}.{key}", getattr(config, attr))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    writer.add_token_scores([0.0] * len(vocab))
    if config.pad_token_id is not None:
        writer.add_pad_token_id(config.pad_token_id)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(model, processor, model_type=arch)
    state = model.state_dict()
    written = set()
    for gguf_name, hf_name in names.items():
        if hf_name not in state or hf_name in written:
            continue
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = state[hf_name].detach().float().numpy()
        writer.add_tensor(gguf_name, _stored(arch, gguf_name, w, config))
        written.add(hf_name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
