"""A tiny, fully local mlx-lm setup: a Llama model, its tokenizer and a jsonl dataset.

Why this exists: the programs people actually run under a launcher are
``mlx_lm.lora`` and friends, and testing orch against them must not need the
network or the Hugging Face Hub (CI has neither). Everything here is built
from scratch, deterministically, in a directory the caller owns:

* ``model/``: ``config.json`` (``model_type: llama``, hidden 32, 2 layers,
  2 heads), ``model.safetensors`` with seeded random weights written through
  mlx-lm's own Llama class (so the tensor names are exactly what its loader
  expects), and a word-level tokenizer trained with the ``tokenizers`` library
  on the dataset text, saved as ``tokenizer.json`` + ``tokenizer_config.json``
  so transformers' ``PreTrainedTokenizerFast`` loads it with no Hub lookup.
* ``data/``: ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` of ``{"text": ...}``.

Command line (for benchmarks and recording fixtures)::

    python -m tests.mlxlm_fixture DIR   # prints the model and data paths
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

SEED = 0
HIDDEN = 32
LAYERS = 2
HEADS = 2
EOS, UNK, PAD = "</s>", "<unk>", "<pad>"

# Environment for running mlx-lm against the fixture with no network at all.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

_SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the old man", "a small child", "the teacher", "our cook"]
_VERBS = ["sees", "likes", "finds", "follows", "paints", "carries", "wants", "reads"]
_OBJECTS = ["the red ball", "a green book", "the big tree", "some warm bread", "the blue sea", "a quiet song",
            "the long road", "an open door"]
_PLACES = ["in the park", "at home", "by the river", "after dinner", "every morning", "near the school"]


@dataclass(frozen=True)
class MlxLmFixture:
    root: Path
    model: Path
    data: Path

    def lora_args(self, adapter_path: Path | str, *, iters: int = 4, batch_size: int = 2) -> list[str]:
        """Arguments for ``mlx_lm.lora`` that train on this fixture in well under a minute."""
        return [
            "--model", str(self.model), "--train", "--data", str(self.data),
            "--iters", str(iters), "--batch-size", str(batch_size), "--steps-per-report", "1",
            "--steps-per-eval", str(iters), "--val-batches", "2", "--num-layers", str(LAYERS),
            "--max-seq-length", "64", "--seed", str(SEED), "--adapter-path", str(adapter_path),
        ]


def sentences(n: int, offset: int = 0) -> list[str]:
    """``n`` deterministic short sentences (no randomness: the same on every machine)."""
    out = []
    for i in range(offset, offset + n):
        s = _SUBJECTS[i % len(_SUBJECTS)]
        v = _VERBS[(i * 3 + 1) % len(_VERBS)]
        o = _OBJECTS[(i * 5 + 2) % len(_OBJECTS)]
        p = _PLACES[(i * 7 + 3) % len(_PLACES)]
        out.append(f"{s} {v} {o} {p} .")
    return out


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _build_tokenizer(model_dir: Path, corpus: list[str]) -> int:
    """Train a word-level tokenizer on the corpus; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=[PAD, UNK, EOS]))
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
        "model_max_length": 512, "clean_up_tokenization_spaces": False,
    }, indent=1))
    (model_dir / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": EOS, "unk_token": UNK, "pad_token": PAD}, indent=1))
    return tok.get_vocab_size()


def _build_model(model_dir: Path, vocab_size: int) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "intermediate_size": 2 * HIDDEN,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size, "max_position_embeddings": 128, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
    }
    mx.random.seed(SEED)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))


def build(root: Path | str) -> MlxLmFixture:
    """Create ``root/model`` and ``root/data`` (``root`` may exist); returns their paths."""
    root = Path(root)
    model_dir, data_dir = root / "model", root / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    train, valid, test = sentences(48), sentences(8, offset=48), sentences(4, offset=56)
    _write_jsonl(data_dir / "train.jsonl", train)
    _write_jsonl(data_dir / "valid.jsonl", valid)
    _write_jsonl(data_dir / "test.jsonl", test)
    vocab = _build_tokenizer(model_dir, train + valid + test)
    _build_model(model_dir, vocab)
    return MlxLmFixture(root=root, model=model_dir, data=data_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.mlxlm_fixture DIR")
    fx = build(sys.argv[1])
    print(json.dumps({"model": str(fx.model), "data": str(fx.data)}))
