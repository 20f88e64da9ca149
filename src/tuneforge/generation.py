"""Text generation from a causal language model: a registry name, a local folder or a run directory.

A thin layer over ``model.generate``: options are validated (``key=value`` pairs with the allowed keys
named on error), prompts are rendered with the tokenizer's chat template in chat mode (or encoded as raw
text), prompts are batched by length (longest first, outputs returned in input order) and
left-padded by the tokenizer, stop strings go to transformers' ``StopStringCriteria``
and are cut from the returned text. Greedy output is token-for-token ``model.generate``'s (tested).

Chat mode defaults to what the model was trained for: a run of a chat objective (``ObjectiveSpec.chat``:
``task=sft``) chats (with the run's ``task.system_prompt``), another generative run (``task=clm``) continues
raw text, and any other folder chats when its tokenizer has a chat template. ``chat=true|false`` overrides
that. The model runs on ``device`` (``auto``: the best present, as ``train.device``).
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError, field_validator

from tuneforge.config.schema import StrictModel
from tuneforge.errors import ConfigError
from tuneforge.track.rundir import model_folder

__all__ = ["GenerationOptions", "LoadedModel", "generate", "load_model", "parse_options", "stream_reply"]

Prompt = str | list[dict[str, str]]


class GenerationOptions(StrictModel):
    """Decoding options; unset sampling options keep the model's own generation_config values."""

    max_new_tokens: int = Field(128, ge=1, le=8192, description="tokens to generate at most")
    do_sample: bool = Field(False, description="sample (true) or greedy / beam search (false)")
    temperature: float | None = Field(None, gt=0, description="sampling temperature (do_sample=true)")
    top_k: int | None = Field(None, ge=0, description="sample from the k most likely tokens (0 = off)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    num_beams: int = Field(1, ge=1, description="beam search width (1 = off)")
    repetition_penalty: float = Field(1.0, gt=0, description="CTRL-style penalty on repeated tokens")
    stop: list[str] = Field(default_factory=list, description="strings that end generation (cut from the output); "
                            "stop=### or a YAML list stop=['###', '\\n\\n'] (\\n and \\t are newline and tab)")
    seed: int | None = Field(None, description="seed for sampling")
    chat: bool | None = Field(None, description="apply the chat template (default: what the model was trained for)")
    system_prompt: str | None = Field(None, description="system message in chat mode (default: the run's)")
    batch_size: int = Field(8, ge=1, description="prompts per generate call")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps (as train.device)")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _nonempty_stops(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must not be empty")
        return v


def parse_options(pairs: Sequence[str]) -> GenerationOptions:
    """``["max_new_tokens=64", "stop=###"]`` -> validated options; errors name the key and allowed keys."""
    from tuneforge.config.loading import parse_override

    values: dict[str, Any] = {}
    for text in pairs:
        key, value = parse_override(text)
        if key not in GenerationOptions.model_fields:
            raise ConfigError(f"unknown generation option; allowed: {', '.join(GenerationOptions.model_fields)}", key=key)
        raw = text.split("=", 1)[1]
        if key == "system_prompt":
            value = raw  # free text, not YAML
        elif key == "stop" and not raw.lstrip().startswith("["):
            value = raw  # "stop=###" is not a YAML comment
        if key == "stop":  # "\n" typed in a shell means a newline
            value = [s.replace("\\n", "\n").replace("\\t", "\t") for s in ([value] if isinstance(value, str) else value or [])]
        values[key] = value
    try:
        return GenerationOptions.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(err["msg"].removeprefix("Value error, "), key=".".join(str(p) for p in err["loc"])) from None


@dataclass
class LoadedModel:
    """A model ready to generate, with the defaults its origin implies (see module docstring)."""

    model: Any
    tokenizer: Any
    chat: bool
    system_prompt: str | None
    source: str
    prefix: str = ""  # put before every prompt (a seq2seq run's task.source_prefix)


def load_model(target: str | Path, device: str = "auto") -> LoadedModel:
    """Load a causal LM or an encoder-decoder (seq2seq runs: the source goes to the encoder, the output is the
    decoder's text) from a run directory, a registry name or a local HF folder (merged or adapter)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from tuneforge.engine.runtime import resolve_device
    from tuneforge.methods.saved import load_trained
    from tuneforge.models.registry import model_family, resolve_model

    where = resolve_device(device)  # an absent device fails before any weights load
    run_dir = Path(str(target))
    system_prompt, chat, prefix = None, None, ""
    if (run_dir / "config.yaml").is_file() and (model_folder(run_dir) / "config.json").is_file():
        from tuneforge.config import load_config
        from tuneforge.objectives import OBJECTIVES, get_spec

        run = load_config(run_dir / "config.yaml")
        spec = get_spec(run.task.name)
        if not (spec.generative or spec.config.seq2seq):
            allowed = ", ".join(n for n, s in OBJECTIVES.items() if s.generative or s.config.seq2seq)
            raise ConfigError(f"{run_dir} is a '{run.task.name}' run; generation needs a causal LM or seq2seq run "
                              f"(task {allowed})")
        folder, chat = model_folder(run_dir), spec.chat
        system_prompt = run.task.model_dump().get("system_prompt")
        prefix = run.task.model_dump().get("source_prefix") or ""
    else:
        folder = resolve_model(str(target))
        if model_family(folder) not in ("decoder", "encoder-decoder"):
            raise ConfigError(f"'{target}' is an {model_family(folder)} model; generation needs a decoder (causal LM) "
                              "or an encoder-decoder", key="model")
    seq2seq = model_family(folder) == "encoder-decoder"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = load_trained(auto, folder, dtype=torch.float32).eval().to(where)
    if chat is None:
        chat = tokenizer.chat_template is not None and not seq2seq
    return LoadedModel(model, tokenizer, chat, system_prompt, str(target), prefix)


def _messages(prompt: Prompt, system_prompt: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def _render(tokenizer: Any, prompts: Sequence[Prompt], chat: bool, system_prompt: str | None) -> list[str]:
    if not chat:
        if any(not isinstance(p, str) for p in prompts):
            raise ConfigError("message lists need chat mode (chat=true)", key="chat")
        return list(prompts)
    if tokenizer.chat_template is None:
        raise ConfigError("this model's tokenizer has no chat template; use chat=false for raw text "
                          "(or train it with task=sft, which stores the template it used)", key="chat")
    return [tokenizer.apply_chat_template(_messages(p, system_prompt), tokenize=False, add_generation_prompt=True)
            for p in prompts]


def _stops(tokenizer: Any, options: GenerationOptions, chat: bool) -> list[str]:
    stops = list(options.stop)
    # A ChatML template on a tokenizer without <|im_end|> as a token (task.template=chatml on a base
    # model): the end of turn is a string, not EOS.
    template = tokenizer.chat_template or ""
    if chat and "<|im_end|>" in template and "<|im_end|>" not in tokenizer.get_vocab() and "<|im_end|>" not in stops:
        stops.append("<|im_end|>")
    return stops


def _config(model: Any, tokenizer: Any, options: GenerationOptions, stops: list[str]):
    cfg = copy.deepcopy(model.generation_config)
    kwargs: dict[str, Any] = {
        "max_new_tokens": options.max_new_tokens, "do_sample": options.do_sample, "num_beams": options.num_beams,
        "repetition_penalty": options.repetition_penalty, "stop_strings": stops or None,
    }
    if options.do_sample:
        kwargs |= {k: getattr(options, k) for k in ("temperature", "top_k", "top_p") if getattr(options, k) is not None}
    cfg.update(**kwargs)
    if cfg.pad_token_id is None:
        cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return cfg


def _cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _encode(tokenizer: Any, texts: list[str], chat: bool, side: str = "left") -> dict[str, torch.Tensor]:
    """Prompts padded on the left (a decoder continues them), or on the right for an encoder's input
    (absolute position embeddings, e.g. BERT2BERT, must see every source from position 0)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # A rendered chat template already holds its special tokens (BOS included where the model wants one).
    return tokenizer(texts, padding=True, padding_side=side, add_special_tokens=not chat, return_tensors="pt")


def _on(model: Any, enc: Any) -> dict[str, torch.Tensor]:
    """Encoded prompts on the model's device."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in enc.items()}


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompts: Sequence[Prompt], options: GenerationOptions | None = None, *,
             chat: bool = False, system_prompt: str | None = None, prefix: str = "") -> list[str]:
    """The generated continuation of each prompt (text after the prompt, stop strings cut), in order; for an
    encoder-decoder the decoder's output for each prompt (``prefix`` + prompt) as its source."""
    from transformers import set_seed

    options = options or GenerationOptions()
    stops = _stops(tokenizer, options, chat)
    cfg = _config(model, tokenizer, options, stops)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if encoder_decoder and chat:
        raise ConfigError("an encoder-decoder translates its input; chat mode needs a causal LM (use chat=false)",
                          key="chat")
    texts = _render(tokenizer, prompts, chat, system_prompt)
    if options.seed is not None:
        set_seed(options.seed)
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(texts)
    step = 1 if _drops_position_ids(model) else options.batch_size
    try:
        with warnings.catch_warnings():
            # peft's notice that it drops position ids: harmless once no prompt is padded (step 1 above)
            warnings.filterwarnings("ignore", message="Position ids are not supported", category=UserWarning)
            for idx in _length_sorted(tokenizer, [prefix + t for t in texts], chat, step):
                batch = [prefix + texts[i] for i in idx]
                enc = _on(model, _encode(tokenizer, batch, chat, "right" if encoder_decoder else "left"))
                seqs = model.generate(**enc, generation_config=cfg, tokenizer=tokenizer if stops else None)
                # an encoder-decoder's output is the decoder's text alone; a decoder's continues the prompt
                new = seqs if encoder_decoder else seqs[:, enc["input_ids"].shape[1] :]
                for i, row in zip(idx, new, strict=True):
                    out[i] = _cut(tokenizer.decode(row, skip_special_tokens=True), stops)[0]
    finally:
        model.train(was_training)
    return out


def _length_sorted(tokenizer: Any, texts: list[str], chat: bool, batch_size: int) -> list[list[int]]:
    """Batches of prompt indices, longest prompts first, so that a batch's prompts have similar lengths.

    Every prompt of a batch is padded to the longest one and the pad positions are computed at every step
    (prefill and each new token's attention over the cache); prompts in input order can put a 20-token
    prompt beside a 300-token one. Greedy outputs do not depend on the batch a prompt lands in (a test
    checks them against ``model.generate`` one prompt at a time); the caller restores the input order.
    """
    if batch_size <= 1 or len(texts) <= batch_size:
        return [list(range(i, min(i + batch_size, len(texts)))) for i in range(0, len(texts), batch_size)]
    lengths = [len(x) for x in tokenizer(texts, add_special_tokens=not chat)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _drops_position_ids(model: Any) -> bool:
    """Whether ``model`` is a peft soft-prompt model (prompt tuning, P-tuning), whose forward discards the
    position ids transformers derives from the attention mask: a left-padded prompt would then be read
    at shifted positions, so such models generate one prompt at a time (no padding, positions exact)."""
    cfg = getattr(model, "active_peft_config", None)
    kind = getattr(getattr(cfg, "peft_type", None), "value", None)
    return kind in ("PROMPT_TUNING", "P_TUNING")


def stream_reply(loaded: LoadedModel, messages: list[dict[str, str]], options: GenerationOptions,
                 write: Callable[[str], Any]) -> str:
    """Generate the assistant's next turn for ``messages``, passing text to ``write`` as it is produced.

    Text that might be the start of a stop string is held back until it is known not to be one.
    """
    from transformers import TextIteratorStreamer, set_seed

    tok, model = loaded.tokenizer, loaded.model
    stops = _stops(tok, options, chat=True)
    cfg = _config(model, tok, options, stops)
    text = _render(tok, [messages], True, options.system_prompt or loaded.system_prompt)[0]
    enc = _on(model, _encode(tok, [text], chat=True))
    if options.seed is not None:
        set_seed(options.seed)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = {**enc, "generation_config": cfg, "streamer": streamer, "tokenizer": tok if stops else None}
    worker = threading.Thread(target=torch.inference_mode()(model.generate), kwargs=kwargs, daemon=True)
    worker.start()
    hold = max((len(s) for s in stops), default=1) - 1
    reply, shown, stopped = "", 0, False
    for piece in streamer:
        if stopped:
            continue
        reply += piece
        cut, stopped = _cut(reply, stops)
        upto = len(cut) if stopped else max(shown, len(reply) - hold)
        write(reply[shown:upto])
        shown = upto
    worker.join()
    final, _ = _cut(reply, stops)
    write(final[shown:])
    return final
