"""Nothing in fedlora unpickles: an AST scan of src/fedlora (code, not comments or strings).

Unpickling is code execution, and in federated learning the sender is the untrusted party. Every
received or loaded tensor goes through safetensors (`fl/payload.py`, `fl/checkpoint.py`), and
transformers loads weights with `use_safetensors=True` (never a pickled pytorch_model.bin). The
scanner resolves import aliases (`import torch as t; t.load(...)`, `from torch import load`), and
a self-check proves it flags each forbidden pattern, so this test can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedlora"

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                     "torch.serialization"}
"""Importing these at all is refused (joblib and shelve are pickle underneath)."""
FORBIDDEN_CALLS = {"torch.load", "torch.jit.load", "torch.hub.load", "torch.hub.load_state_dict_from_url",
                   "pandas.read_pickle", "numpy.lib.format.read_array", "yaml.load", "yaml.unsafe_load",
                   "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"}
"""Calls that unpickle (or, for yaml, build arbitrary Python objects)."""


class _Scanner(ast.NodeVisitor):
    def __init__(self, where: str):
        self.where, self.alias, self.found = where, {}, []

    def _flag(self, node: ast.AST, what: str) -> None:
        self.found.append(f"{self.where}:{node.lineno}: {what}")

    def _dotted(self, node: ast.AST) -> str | None:
        """'torch.load' for torch.load / t.load (import torch as t) / load (from torch import load)."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        parts.append(self.alias.get(node.id, node.id))
        name = ".".join(reversed(parts))
        return name.replace("np.", "numpy.", 1) if name.startswith("np.") else (
            name.replace("pd.", "pandas.", 1) if name.startswith("pd.") else name)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.alias[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            self._check_module(node, a.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        self._check_module(node, module)
        for a in node.names:
            full = f"{module}.{a.name}"
            self.alias[a.asname or a.name] = full
            self._check_module(node, full)
            if full in FORBIDDEN_CALLS:
                self._flag(node, f"imports {full}")

    def _check_module(self, node: ast.AST, module: str) -> None:
        if any(module == m or module.startswith(m + ".") for m in FORBIDDEN_MODULES):
            self._flag(node, f"imports {module}")

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func) or ""
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if name in FORBIDDEN_CALLS or name.endswith(".read_pickle"):
            self._flag(node, f"calls {name}")
        if name in ("numpy.load", "numpy.lib.npyio.load") and not _is_false(keywords.get("allow_pickle")):
            if "allow_pickle" in keywords:
                self._flag(node, f"calls {name} with allow_pickle not literally False")
        if name.endswith(".from_pretrained") and "Tokenizer" not in name and "Config" not in name:
            if "gguf_file" not in keywords and not _is_true(keywords.get("use_safetensors")):
                self._flag(node, f"calls {name} without use_safetensors=True (may unpickle a .bin)")
        self.generic_visit(node)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def scan(source: str, where: str = "<string>") -> list[str]:
    scanner = _Scanner(where)
    scanner.visit(ast.parse(source))
    return scanner.found


def test_package_never_unpickles():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, f"scanner found too few files under {SRC}"
    found = [hit for path in files for hit in scan(path.read_text(encoding="utf-8"), str(path.relative_to(SRC)))]
    assert not found, "pickle-capable loading in fedlora:\n" + "\n".join(found)


@pytest.mark.parametrize("source", [
    "import pickle",
    "import pickle as p",
    "from pickle import loads",
    "import dill",
    "import cloudpickle",
    "import joblib",
    "from joblib import load",
    "import torch\ntorch.load('x.pt')",
    "import torch as T\nT.load(buf, weights_only=True)",
    "from torch import load\nload('x')",
    "from torch import load as L\nL('x')",
    "import torch.serialization",
    "from torch.serialization import add_safe_globals",
    "import torch\ntorch.jit.load('m.pt')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import numpy\nnumpy.load('x.npy', allow_pickle=flag)",
    "import pandas as pd\npd.read_pickle('x.pkl')",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained('x')",
    "from peft import PeftModel\nPeftModel.from_pretrained(m, 'dir', use_safetensors=False)",
])
def test_scanner_flags(source):
    assert scan(source), f"the scanner missed: {source!r}"


@pytest.mark.parametrize("source", [
    "# torch.load(x) and import pickle, in a comment",
    "'''import pickle; torch.load(x)'''",
    "x = 'pickle'",
    "from safetensors.torch import load as st_load\nst_load(blob)",
    "from safetensors.torch import load_file\nload_file('a.safetensors')",
    "import numpy as np\nnp.load('x.npy')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
    "import torch\ntorch.save(obj, buf)",
    "import yaml\nyaml.safe_load(text)",
    "import json\njson.loads(s)",
    "AutoTokenizer.from_pretrained('x')",
    "AutoModelForCausalLM.from_pretrained('x', use_safetensors=True)",
    "AutoModelForCausalLM.from_pretrained(d, gguf_file='m.gguf')",
])
def test_scanner_passes_safe_code(source):
    assert scan(source) == []


def test_model_directory_with_only_pickled_weights_is_refused(tmp_path):
    """A local model whose weights are only a pickled pytorch_model.bin is not loaded (ModelError)."""
    from fedlora.model import ModelError, build_tiny_model
    from fedlora.model.load import _from_pretrained

    import torch

    model, tok = build_tiny_model(0)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the legacy pickled format
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "pytorch_model.bin").exists() and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(ModelError, match="safetensors"):
        _from_pretrained(str(tmp_path), model.dtype)
    model.save_pretrained(tmp_path, safe_serialization=True)  # the same model as safetensors loads
    loaded, _ = _from_pretrained(str(tmp_path), model.dtype)
    assert loaded.config.vocab_size == model.config.vocab_size
