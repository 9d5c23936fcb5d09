"""GPT-2 and its tokenizer: by Hub name, from a save_pretrained folder, or randomly initialised
from a GPT2Config .json (configs/models/)."""
from __future__ import annotations

from pathlib import Path

import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import PreTrainedTokenizerBase

from medgpt.config import ModelConfig
from medgpt.errors import UserError

DEFAULT_TOKENIZER = "gpt2"


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


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    name = cfg.tokenizer or (DEFAULT_TOKENIZER if _is_config_file(cfg.model) else cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise _hub_error("tokenizer", name, err) from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer '{name}' has no EOS token; use a GPT-2 tokenizer")
    return tokenizer


def build_model(cfg: ModelConfig, config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """The model to train. Random init is seeded, so every rank builds the same weights.

    Under ZeRO-3 the caller must hold a live ``HfDeepSpeedConfig`` (see train.py): transformers
    then builds the model inside deepspeed.zero.Init (partitioned as it is created) and gathers
    each partitioned parameter to run its own weight init, so the weights equal a non-ZeRO build
    with the same seed.
    """
    transformers.set_seed(seed)
    if _is_config_file(cfg.model):
        return AutoModelForCausalLM.from_config(config)
    return AutoModelForCausalLM.from_pretrained(cfg.model, config=config)
