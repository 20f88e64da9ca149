"""The ``generate`` and ``chat`` verbs: text from a causal LM (registry name, HF folder or run directory).

``tuneforge generate MODEL "prompt" ... [key=value ...]`` prints one JSON line per prompt;
``--input F --output G.jsonl`` generates for every row of F (``prompt``: text, or ``messages``: a chat)
in batches. ``tuneforge chat MODEL [key=value ...]`` is an interactive chat that streams the reply, keeps
the history and applies the chat template; ``/reset`` clears the history and ``/exit`` quits. Options are
those of `tuneforge.generation.GenerationOptions` (max_new_tokens, do_sample, temperature, top_k, top_p,
num_beams, repetition_penalty, stop, seed, chat, system_prompt, batch_size).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["read_prompts", "register", "split_args"]


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(prompts, options): ``name=value`` is an option when the name is a known option or the argument has
    no whitespace (so a mistyped ``max_tokens=3`` is an error, not a prompt); other arguments are prompts."""
    from tuneforge.generation import GenerationOptions

    def is_option(a: str) -> bool:
        m = re.match(r"^([A-Za-z_]\w*)=", a)
        return bool(m) and (m.group(1) in GenerationOptions.model_fields or not re.search(r"\s", a))

    return [a for a in args if not is_option(a)], [a for a in args if is_option(a)]


def read_prompts(path: Path) -> list[tuple[dict[str, Any], Any]]:
    """(row, prompt) for each row of ``path``: ``messages`` (a chat) or ``prompt`` / ``text`` (raw text)."""
    from tuneforge.data.readers import read_table
    from tuneforge.errors import DataError

    table = read_table(path)
    out = []
    for row, line in zip(table.rows, table.lines, strict=True):
        if "messages" in row:
            msgs = row["messages"]
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
            if not ok:
                raise DataError("'messages' must be a non-empty list of {role, content} strings", path, line)
            out.append((row, msgs))
            continue
        key = "prompt" if "prompt" in row else "text"
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DataError("each row needs a non-empty 'prompt' (or 'text') string, or 'messages'", path, line)
        out.append((row, value))
    return out


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        model: Annotated[str, typer.Argument(help="registry model name, HF folder or run directory")],
        args: Annotated[list[str] | None, typer.Argument(help="prompts, and key=value options (max_new_tokens=64 "
                                                          "do_sample=true temperature=0.7 stop=### seed=0 ...)")] = None,
        input: Annotated[Path | None, typer.Option("--input", help="rows with 'prompt' (text) or 'messages' (chat)")] = None,
        output: Annotated[Path | None, typer.Option("--output", help="write {row..., generation} JSON lines here")] = None,
    ) -> None:
        """Generate text for prompts or a file of prompts (greedy unless do_sample=true)."""
        from tuneforge.errors import ConfigError
        from tuneforge.generation import generate as run_generate
        from tuneforge.generation import load_model, parse_options
        from tuneforge.track import atomic_write_text

        prompts, option_args = split_args(list(args or []))
        opts = parse_options(option_args)
        rows: list[dict[str, Any]] = [{"prompt": p} for p in prompts]
        items: list[Any] = list(prompts)
        if input is not None:
            for row, prompt in read_prompts(input):
                rows.append(row)
                items.append(prompt)
        if not items:
            raise ConfigError("give prompts or --input FILE")
        loaded = load_model(model, device=opts.device)
        chat = opts.chat if opts.chat is not None else loaded.chat
        if any(not isinstance(p, str) for p in items):
            chat = True
        texts = run_generate(loaded.model, loaded.tokenizer, items, opts, chat=chat,
                             system_prompt=opts.system_prompt or loaded.system_prompt, prefix=loaded.prefix)
        lines = [json.dumps({**row, "generation": t}, ensure_ascii=False) for row, t in zip(rows, texts, strict=True)]
        if output is not None:
            atomic_write_text(output, "".join(line + "\n" for line in lines))
            typer.echo(f"wrote {len(lines)} generations to {output}")
        else:
            for line in lines:
                typer.echo(line)

    @app.command()
    def chat(
        model: Annotated[str, typer.Argument(help="registry model name, HF folder or run directory")],
        args: Annotated[list[str] | None, typer.Argument(help="key=value options (max_new_tokens=256 ...)")] = None,
    ) -> None:
        """Chat with a model in the terminal: replies stream as they are generated; /reset, /exit."""
        from tuneforge.errors import ConfigError
        from tuneforge.generation import load_model, parse_options, stream_reply

        prompts, option_args = split_args(list(args or []))
        if prompts:
            raise ConfigError(f"'{prompts[0]}' is not a key=value option of chat")
        opts = parse_options(option_args)
        loaded = load_model(model, device=opts.device)
        if loaded.tokenizer.chat_template is None:
            raise ConfigError(f"'{model}' has no chat template; use `tuneforge generate` for raw text, or train it "
                              "with task=sft (which stores the template it used)")
        typer.echo(f"chatting with {model} (/reset clears the history, /exit quits)")
        history: list[dict[str, str]] = []
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            cmd = line.strip()
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                history.clear()
                continue
            if not cmd:
                continue
            history.append({"role": "user", "content": line})
            typer.echo("assistant> ", nl=False)
            reply = stream_reply(loaded, history, opts, write=lambda t: typer.echo(t, nl=False))
            typer.echo("")
            history.append({"role": "assistant", "content": reply})
