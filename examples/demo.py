"""Save and load a small GPT model and its AdamW state with dcp_filesystem, bit-exact.

Run from a checkout: ``make demo`` or ``python examples/demo.py``.

The state dict ``{"model", "optim", "step"}`` of a 4-layer GPT after two AdamW steps is saved with
``torch.distributed.checkpoint`` through this package's ``FileSystemWriter`` (both formats) and, for
comparison, through stock torch's. Each checkpoint is loaded into a freshly built model and optimizer,
every tensor is compared bit for bit and every other value with ``==``, and this package's
checkpoints are checked with ``python -m dcp_filesystem verify``. One row per writer is printed;
the exit status is 1 if any row fails.
"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's package, whatever is installed

from dcp_filesystem import FileSystemReader, FileSystemWriter, SerializationFormat  # noqa: E402

VOCAB, DIM, HEADS, LAYERS, CONTEXT, BATCH = 8192, 384, 6, 4, 32, 2

# DCP warns that no process group is initialised (one process is intended here); stock torch's writer
# uses TypedStorage on some versions.
warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated")


class GPT(nn.Module):
    """Token and position embeddings, pre-norm transformer blocks (causal attention, MLP), LM head."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(CONTEXT, DIM)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(DIM, HEADS, 4 * DIM, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(LAYERS)
        )
        self.ln_f, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        n = tokens.shape[1]
        x = self.tok(tokens) + self.pos(torch.arange(n))
        causal = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        for block in self.blocks:
            x = block(x, src_mask=causal)
        return self.head(self.ln_f(x))


def trained(seed, lr, steps):
    """A model built from `seed` and its AdamW optimizer after `steps` steps on random tokens."""
    torch.manual_seed(seed)
    model = GPT()
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        tokens = torch.randint(VOCAB, (BATCH, CONTEXT + 1))
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model, optim


# dcp.save / dcp.load in one process need torch 2.4 (where torch.distributed.checkpoint.staging
# arrived): 2.1 has neither, 2.2's dcp.save needs a process group, and 2.3's dcp.load leaves
# non-tensor values (the optimizer's lr, betas, ...) out of the caller's dict (pytorch#125528).
# save_state_dict / load_state_dict with no_dist=True work on all three.
NEW_ENTRY_POINTS = importlib.util.find_spec("torch.distributed.checkpoint.staging") is not None


def save(state_dict, writer):
    if NEW_ENTRY_POINTS:
        dcp.save(state_dict, storage_writer=writer)
    else:
        dcp.save_state_dict(state_dict, storage_writer=writer, no_dist=True)


def load(state_dict, reader):
    if NEW_ENTRY_POINTS:
        dcp.load(state_dict, storage_reader=reader)
    else:
        dcp.load_state_dict(state_dict, storage_reader=reader, no_dist=True)


def leaves(obj, path=""):
    """{path: value} for every leaf of nested dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {p: v for k, child in obj.items() for p, v in leaves(child, f"{path}/{k}").items()}
    if isinstance(obj, (list, tuple)):
        return {p: v for i, child in enumerate(obj) for p, v in leaves(child, f"{path}/{i}").items()}
    return {path: obj}


def same(a, b):
    """Tensors: same dtype, shape and bytes (so NaN equals NaN, -0.0 differs from 0.0); other values: same type, ==."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        as_bytes = (t.contiguous().view(-1).view(torch.uint8) for t in (a, b))
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*as_bytes)
    return type(a) is type(b) and a == b


def mismatches(expected, actual):
    """Sorted paths where `actual` differs from `expected`, including paths only one of them has."""
    exp, act = leaves(expected), leaves(actual)
    return sorted(p for p in exp.keys() | act.keys() if p not in exp or p not in act or not same(exp[p], act[p]))


def verify(path):
    """Exit status of ``python -m dcp_filesystem verify path`` (run with this checkout's package)."""
    command = [sys.executable, "-m", "dcp_filesystem", "verify", path]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr, file=sys.stderr)
    return proc.returncode


ROWS = [  # writer, format, StorageWriter for a path, StorageReader class, whether to run verify
    ("dcp_filesystem", "TORCH_SAVE", lambda path: FileSystemWriter(path, thread_count=2), FileSystemReader, True),
    ("dcp_filesystem", "SAFETENSORS", lambda path: FileSystemWriter(
        path, thread_count=2, serialization_format=SerializationFormat.SAFETENSORS), FileSystemReader, True),
    ("torch (stock)", "TORCH_SAVE", lambda path: dcp.FileSystemWriter(path, thread_count=2), dcp.FileSystemReader,
     False),
]
TABLE = "{:<16}{:<13}{:>8}{:>12}{:>6}{:>11}{:>11}{:>11}{:>8}"


def main():
    model, optim = trained(seed=0, lr=1e-3, steps=2)
    expected = {"model": model.state_dict(), "optim": optim.state_dict(), "step": 2}
    print(f"GPT: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, AdamW after 2 steps\n")
    print(TABLE.format("writer", "format", "entries", "bytes", "files", "save GB/s", "load GB/s", "bit-exact",
                       "verify"))
    failed = False
    for writer_name, fmt, make_writer, reader_cls, run_verify in ROWS:
        # Another model and optimizer (other seed and lr; one step, so that the AdamW state exists) to load into.
        fresh_model, fresh_optim = trained(seed=1, lr=5e-4, steps=1)
        state = {"model": fresh_model.state_dict(), "optim": fresh_optim.state_dict(), "step": 0}
        with tempfile.TemporaryDirectory() as path:
            start = time.perf_counter()
            save(expected, make_writer(path))
            save_s = time.perf_counter() - start
            reader = reader_cls(path)
            start = time.perf_counter()
            load(state, reader)  # in place: tensors are copied into the fresh model's and optimizer's tensors
            load_s = time.perf_counter() - start
            fresh_model.load_state_dict(state["model"])
            fresh_optim.load_state_dict(state["optim"])  # sets the non-tensor values (lr, betas, ...)
            actual = {"model": fresh_model.state_dict(), "optim": fresh_optim.state_dict(), "step": state["step"]}
            differ = mismatches(expected, actual)
            verified = verify(path) == 0 if run_verify else None
            entries = len(reader.read_metadata().state_dict_metadata)
            files = os.listdir(path)
            size = sum(os.path.getsize(os.path.join(path, f)) for f in files)
        if differ:
            print(f"{writer_name} {fmt}: {len(differ)} mismatch(es), the first at {differ[0]}", file=sys.stderr)
        failed = failed or bool(differ) or verified is False
        print(TABLE.format(writer_name, fmt, entries, size, len(files), f"{size / save_s / 1e9:.2f}",
                           f"{size / load_s / 1e9:.2f}", "no" if differ else "yes",
                           {True: "OK", False: "FAILED", None: "-"}[verified]), flush=True)
    print("\nGB/s: one save and one load each; `make bench` takes medians of interleaved runs.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
