"""GPT-2 and its tokenizer: by Hub name, from a save_pretrained folder, or randomly initialised
from a GPT2Config .json (configs/models/)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations import HfDeepSpeedConfig

from medgpt.attention import ATTENTION, DOCUMENT_MASK, document_mask
from medgpt.config import ModelConfig
from medgpt.errors import UserError

DEFAULT_TOKENIZER = "gpt2"
# medgpt's precision names (config.PRECISIONS) as torch dtypes: of a run's matmuls and of exported weights.
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DTYPES = {"bfloat16": "bf16"}  # DeepSpeed's torch_autocast dtype names, as medgpt.ds_config writes them


def _is_config_file(name: str) -> bool:
    return name.endswith(".json")


def _hub_error(what: str, name: str, err: Exception) -> UserError:
    return UserError(f"cannot load {what} '{name}' ({type(err).__name__}: {str(err).splitlines()[0]}). "
                     "It is neither a local folder nor reachable on the Hugging Face Hub; offline, pass a "
                     "local folder (e.g. --tokenizer ../shared/data/gpt2-tokenizer) or a GPT2Config .json "
                     "as --model (e.g. configs/models/tiny.json)")


def load_model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The model's architecture config with medgpt's dropout applied (cheap: no weights)."""
    if _is_config_file(cfg.model) and not Path(cfg.model).is_file():
        raise UserError(f"model config file '{cfg.model}' does not exist")
    try:
        config = (transformers.GPT2Config.from_json_file(cfg.model) if _is_config_file(cfg.model)
                  else AutoConfig.from_pretrained(cfg.model))
    except (OSError, ValueError) as err:
        raise _hub_error("model", cfg.model, err) from None
    if config.model_type != "gpt2":
        raise UserError(f"model '{cfg.model}' is a {config.model_type} model; medgpt trains the GPT-2 family")
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = cfg.dropout
    return config


def check_model_shape(config: PretrainedConfig, seq_len: int) -> PretrainedConfig:
    """The config, if its shape trains at seq_len. Without this check the run fails once under way:
    transformers raises for n_embd % n_head in the model constructor (models/gpt2/modeling_gpt2.py:84),
    and a position beyond n_positions indexes past the position embedding (modeling_gpt2.py:492, 576)
    in the first long batch."""
    problems = []
    if config.n_head < 1 or config.n_embd % config.n_head:
        problems.append(f"model n_embd {config.n_embd} is not divisible by n_head {config.n_head}; each attention "
                        "head takes an equal share of n_embd (GPT-2 small: 768 and 12)")
    if seq_len > config.n_positions:
        problems.append(f"seq_len {seq_len} is longer than the model's n_positions {config.n_positions}; lower "
                        f"--seq_len to at most {config.n_positions}")
    if problems:
        raise UserError(*problems)
    return config


# --packing on relies on each packed sample attending only to itself: medgpt's attention takes the
# batch's document mask from the model's keyword arguments (medgpt/attention.py), which transformers
# passes down from the model's forward to the attention function. A version that stopped passing
# them, or chose another attention, would let samples attend across silently. Checked at start,
# functionally.
PROBE_SHAPE = {"vocab_size": 64, "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 2, "bos_token_id": 0,
               "eos_token_id": 0}
PACKING_TOLERANCE = 1e-4  # fp32 reordering is ~1e-7; attending to another sample moves the logits by ~1e-1
Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, position_ids) -> logits


def packed_sample_difference(forward: Forward) -> float:
    """How far a sample's logits, packed in a row after another sample, are from the sample alone."""
    first, second = torch.arange(1, 6), torch.arange(10, 17)
    row = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second))])[None]
    with torch.no_grad():
        packed = forward(row, positions)[0, len(first):]
        alone = forward(second[None], torch.arange(len(second))[None])[0]
    return (packed - alone).abs().max().item()


def check_packing_isolation(forward: Forward | None = None) -> None:
    """Refuse --packing on where packed samples would see each other: a tiny GPT-2 built and called
    the way training builds and calls it (build_model's attention; medgpt/loss.py: input_ids,
    position_ids and the document mask, no cache), unless ``forward`` says otherwise."""
    if forward is None:
        with torch.random.fork_rng():  # the run's random streams stay untouched
            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config(**PROBE_SHAPE, attn_implementation=ATTENTION)).eval()
        forward = lambda ids, pos: model(input_ids=ids, position_ids=pos,  # noqa: E731
                                         **{DOCUMENT_MASK: document_mask(pos)}, use_cache=False).logits
    difference = packed_sample_difference(forward)
    if difference > PACKING_TOLERANCE:
        raise UserError(f"--packing on: with the installed transformers {transformers.__version__} a packed sample "
                        f"attends to the sample before it in its row (its logits move by {difference:.2g}), so "
                        "questions would see each other's contexts; install a transformers that passes the model's "
                        "keyword arguments to its attention function (pip install -U transformers), or train with "
                        "--packing off")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    name = cfg.tokenizer or (DEFAULT_TOKENIZER if _is_config_file(cfg.model) else cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise _hub_error("tokenizer", name, err) from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer '{name}' has no EOS token; use a GPT-2 tokenizer")
    return tokenizer


def build_model(cfg: ModelConfig, config: PretrainedConfig, ds_config: dict[str, Any],
                seed: int) -> tuple[PreTrainedModel, HfDeepSpeedConfig]:
    """The model to train (GPT-2, or with ``--lora_r`` a peft model of it with adapters: medgpt/lora.py),
    identical on every rank and for every ZeRO stage, and the
    HfDeepSpeedConfig that shares ds_config with transformers: keep it referenced as long as the
    model is used. transformers holds it by weak reference only (integrations/deepspeed.py:267-293)
    and asks it whether ZeRO-3 is on: ``from_pretrained`` then loads inside zero.Init
    (modeling_utils.py:1435) and ``generate`` keeps ZeRO-3 ranks in step (generation/utils.py:2567,
    synced_gpus); once it is collected, transformers silently acts as if there were no DeepSpeed.

    A random init is built whole on each rank and partitioned by DeepSpeed at initialize:
    under zero.Init transformers draws the same distributions in another RNG order, so the
    weights would depend on the ZeRO stage. (The GPT-2 family, 1.5B parameters at most, fits in
    host memory.) Pretrained weights involve no RNG: under ZeRO-3 they load inside zero.Init
    through transformers' DeepSpeed integration, so no rank ever holds the whole model.
    """
    transformers.set_seed(seed)
    random_init = _is_config_file(cfg.model)
    # A random init is built before the HfDeepSpeedConfig exists: with one alive, from_config would
    # build under zero.Init; from_pretrained needs it alive to.
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION) if random_init else None
    hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    if not random_init:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, config=config, attn_implementation=ATTENTION)
    if cfg.activation_checkpointing:
        # transformers' default: non-reentrant torch checkpointing of every block, which works with
        # ZeRO-3's gathered parameters.
        model.activation_checkpointing_enable()
    if cfg.lora_r:
        from medgpt.lora import add_adapters  # imports peft, an optional extra

        model = add_adapters(model, cfg)
        autocast = ds_config.get("torch_autocast", {})
        if autocast.get("enabled"):
            # ZeRO-0 in bf16 is autocast over fp32 weights (medgpt.ds_config); the frozen base needs
            # no fp32 copy: it is kept in the autocast dtype, as DeepSpeed's bf16 would keep it.
            dtype = TORCH_DTYPES[AUTOCAST_DTYPES[autocast["dtype"]]]
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
    return model, hf_deepspeed_config


def check_model_folder(folder: str) -> None:
    """Fail early (before any process group or data loading) on a folder that cannot be a model."""
    if not Path(folder, "config.json").is_file():
        raise UserError(f"model folder '{folder}' does not exist or holds no config.json; pass a folder "
                        "written by save_pretrained (e.g. a trained run's saved model)")


# transformers' loading report: a tensor the config asks for and the file lacks is left randomly
# initialised (a warning only), one the file has and the config does not is dropped.
LOADING_PROBLEMS = {"missing_keys": "missing from the weights", "unexpected_keys": "not in the config's model",
                    "mismatched_keys": "of another shape than the config's"}


def load_saved_model(folder: str, device: torch.device) -> PreTrainedModel:
    """A save_pretrained causal LM, whole on one device, in eval mode: every tensor of the model
    its config.json describes, from its weights file, or a UserError."""
    check_model_folder(folder)
    try:
        model, report = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                             ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(f"cannot load '{folder}' as a causal language model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0]}); a damaged file? Export the model again") from None
    # mismatched_keys holds (name, file's shape, config's shape)
    wrong = [f"{len(names)} tensor(s) {what} (e.g. {min(n[0] if isinstance(n, tuple) else n for n in names)})"
             for kind, what in LOADING_PROBLEMS.items() if (names := report.get(kind))]
    if wrong:
        raise UserError(f"model folder '{folder}': its config.json does not match its weights: {'; '.join(wrong)}. "
                        "A model built from it would answer with randomly initialised parts: restore the config.json "
                        "written with these weights, or export the model again")
    return model.to(device).eval()
