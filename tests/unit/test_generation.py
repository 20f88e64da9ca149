"""Generation: token-for-token parity with ``model.generate``, stop strings, option validation, chat rendering,
and streaming."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.data.chat import TEMPLATES
from tuneforge.errors import ConfigError
from tuneforge.generation import GenerationOptions, LoadedModel, generate, parse_options, stream_reply
from tuneforge.models import resolve_model

PROMPTS = ["the movie was", "a great film and the best", "i saw"]


@pytest.fixture(scope="module")
def llama():
    path = resolve_model("tiny-llama")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_greedy_equals_model_generate_batched_and_alone(llama) -> None:
    model, tok = llama
    ours = generate(model, tok, PROMPTS, GenerationOptions(max_new_tokens=12))
    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False)
    expected = [tok.decode(r, skip_special_tokens=True) for r in ref[:, enc["input_ids"].shape[1]:]]
    assert ours == expected
    for p, text in zip(PROMPTS, ours, strict=True):  # batching (left padding) changes nothing
        one = tok(p, return_tensors="pt")
        alone = model.generate(**one, max_new_tokens=12, do_sample=False)[0, one["input_ids"].shape[1]:]
        assert tok.decode(alone, skip_special_tokens=True) == text


def test_beam_search_and_sampling_options_reach_generate(llama) -> None:
    model, tok = llama
    ours = generate(model, tok, PROMPTS[:1], GenerationOptions(max_new_tokens=8, num_beams=3, repetition_penalty=1.3))
    enc = tok(PROMPTS[:1], return_tensors="pt")
    ref = model.generate(**enc, max_new_tokens=8, num_beams=3, repetition_penalty=1.3, do_sample=False)
    assert ours == [tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    opts = GenerationOptions(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, seed=3)
    assert generate(model, tok, PROMPTS, opts) == generate(model, tok, PROMPTS, opts)  # seeded


def test_stop_strings_end_and_are_cut(llama) -> None:
    model, tok = llama
    full = generate(model, tok, PROMPTS[:1], GenerationOptions(max_new_tokens=20))[0]
    stop = full[3:6]
    assert stop and stop not in full[:3]
    cut = generate(model, tok, PROMPTS[:1], GenerationOptions(max_new_tokens=20, stop=stop))[0]
    assert cut == full[: full.index(stop)]


def test_options_parse_and_errors_name_the_key() -> None:
    opts = parse_options(["max_new_tokens=5", "do_sample=true", "temperature=0.5", "stop=###", "seed=1"])
    assert (opts.max_new_tokens, opts.do_sample, opts.temperature, opts.stop, opts.seed) == (5, True, 0.5, ["###"], 1)
    with pytest.raises(ConfigError, match=r"'max_tokens'.*allowed: max_new_tokens"):
        parse_options(["max_tokens=5"])
    with pytest.raises(ConfigError, match="'temperature'"):
        parse_options(["temperature=0"])


def test_chat_mode_renders_the_template_and_stream_matches(llama) -> None:
    model, tok = llama
    tok.chat_template = TEMPLATES["plain"]
    try:
        opts = GenerationOptions(max_new_tokens=10)
        batch = generate(model, tok, ["hello there"], opts, chat=True, system_prompt="Be kind.")
        rendered = tok.apply_chat_template([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello there"}],
                                           tokenize=False, add_generation_prompt=True)
        assert rendered.endswith("User: hello there\nAssistant:")
        enc = tok(rendered, add_special_tokens=False, return_tensors="pt")
        ref = model.generate(**enc, max_new_tokens=10, do_sample=False)[0, enc["input_ids"].shape[1]:]
        assert batch == [tok.decode(ref, skip_special_tokens=True)]
        pieces: list[str] = []
        loaded = LoadedModel(model, tok, True, "Be kind.", "tiny-llama")
        reply = stream_reply(loaded, [{"role": "user", "content": "hello there"}], opts, pieces.append)
        assert reply == batch[0] == "".join(pieces)
    finally:
        tok.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        generate(model, tok, ["hi"], chat=True)


def test_stop_option_is_raw_text_with_newline_escapes() -> None:
    assert parse_options(["stop=\\n\\n"]).stop == ["\n\n"]
    assert parse_options(["stop=['###', 'END']"]).stop == ["###", "END"]
    assert parse_options(["system_prompt=You are: terse"]).system_prompt == "You are: terse"


def test_prompt_tuned_model_generates_each_prompt_as_if_alone() -> None:
    """peft prompt tuning drops position ids, so a left-padded prompt in a batch would be read at shifted
    positions; generate() runs such models one prompt at a time: every output equals that prompt alone."""
    import warnings

    import peft

    path = resolve_model("tiny-gpt2")  # absolute positions: a shift changes the output
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    ours = generate(model, tok, PROMPTS, GenerationOptions(max_new_tokens=10, batch_size=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p, text in zip(PROMPTS, ours, strict=True):
            one = tok(p, return_tensors="pt")
            alone = model.generate(**one, max_new_tokens=10, do_sample=False)[0, one["input_ids"].shape[1]:]
            assert tok.decode(alone, skip_special_tokens=True) == text


def test_length_sorted_batches_keep_input_order_and_greedy_outputs(llama) -> None:
    """Prompts are batched longest first (less padding); each output is the prompt's own, as if alone."""
    model, tok = llama
    prompts = ["i saw", "a great film and the best of the year, with a cast that", "the movie was",
               "one of the worst films i have ever seen in my", "it"]
    ours = generate(model, tok, prompts, GenerationOptions(max_new_tokens=10, batch_size=2))
    for p, text in zip(prompts, ours, strict=True):
        one = tok(p, return_tensors="pt")
        alone = model.generate(**one, max_new_tokens=10, do_sample=False)[0, one["input_ids"].shape[1]:]
        assert tok.decode(alone, skip_special_tokens=True) == text
    from tuneforge.generation import _length_sorted

    batches = _length_sorted(tok, prompts, False, 2)
    assert batches == [[1, 3], [2, 0], [4]]  # by token count, longest first; ties in input order
