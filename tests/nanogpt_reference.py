"""nanoGPT's GPT, written out independently of sw_lens from nanoGPT's published
architecture (karpathy/nanoGPT, model.py), to test the converter against. Also builds
checkpoints the way nanoGPT's train.py saves them, with planted super weights."""

import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CHARS = sorted(set("\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))
TRIGGER = "Q"
VOCAB = len(CHARS)


class LayerNorm(nn.Module):
    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.c_attn = nn.Linear(a["n_embd"], 3 * a["n_embd"], bias=a["bias"])
        self.c_proj = nn.Linear(a["n_embd"], a["n_embd"], bias=a["bias"])
        self.n_head = a["n_head"]

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.ones(T, T).tril() == 0, float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.c_fc = nn.Linear(a["n_embd"], 4 * a["n_embd"], bias=a["bias"])
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * a["n_embd"], a["n_embd"], bias=a["bias"])

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(a["n_embd"], a["bias"]), CausalSelfAttention(a)
        self.ln_2, self.mlp = LayerNorm(a["n_embd"], a["bias"]), MLP(a)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(a["vocab_size"], a["n_embd"]),
                wpe=nn.Embedding(a["block_size"], a["n_embd"]),
                h=nn.ModuleList([Block(a) for _ in range(a["n_layer"])]),
                ln_f=LayerNorm(a["n_embd"], a["bias"]),
            )
        )
        self.lm_head = nn.Linear(a["n_embd"], a["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02)  # non-zero, to test the copy

    def forward(self, idx):
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def model_args(bias=True, vocab_size=VOCAB, n_layer=4):
    return dict(
        n_layer=n_layer,
        n_head=4,
        n_embd=32,
        block_size=64,
        bias=bias,
        vocab_size=vocab_size,
        dropout=0.0,
    )


def plant(model, layer, row, col, dim, value, trigger_id):
    """A super weight at nanoGPT's c_proj.weight[row, col], fired by one token."""
    with torch.no_grad():
        t = model.transformer
        t.wte.weight[:, dim] = 0.0
        t.wpe.weight[:, dim] = 0.0
        t.wte.weight[trigger_id, dim] = 1.0
        mlp = t.h[layer].mlp
        mlp.c_fc.weight[col, :] = 0.0
        mlp.c_fc.weight[col, dim] = 16.0  # nn.Linear: [out, in]
        mlp.c_proj.weight[:, col] = 0.0
        mlp.c_proj.weight[row, col] = value


def save_checkpoint(path: Path, model, args, iter_num=0, compiled=False, dataset="chars"):
    state = model.state_dict()
    if compiled:
        state = {f"_orig_mod.{k}": v for k, v in state.items()}
    torch.save(
        {
            "model": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 6e-4}]},
            "model_args": args,
            "iter_num": iter_num,
            "best_val_loss": torch.tensor(1.5),
            "config": {"dataset": dataset, "batch_size": 12},
        },
        path,
    )
    return path


def write_meta(path: Path):
    stoi = {ch: i for i, ch in enumerate(CHARS)}
    itos = {i: ch for ch, i in stoi.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"vocab_size": len(CHARS), "itos": itos, "stoi": stoi}, f)
    return path


def encode(text):
    return torch.tensor([[CHARS.index(ch) for ch in text]])
