"""The `loraserve` command (also `python -m loraserve_client`): the public API from a shell.

    loraserve generate --model sql-lora "Write a SQL query:"      # --stream, --max-tokens, --temperature ...
    loraserve models
    loraserve load my-lora /path/to/adapter [--inplace]            # admin: $LORASERVE_ADMIN_TOKEN
    loraserve unload my-lora

--address (or $LORASERVE_ADDRESS, default 127.0.0.1:50051) is the router. Exit status: 0, or 1 with the
server's status and message on stderr (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys

from .client import Client
from .types import ADDRESS_ENV, DEFAULT_ADDRESS, TOKEN_ENV, LoRAServeError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraserve", description="Client of a loraserve router (gRPC).")
    p.add_argument("--address", help=f"router host:port (default ${ADDRESS_ENV} or {DEFAULT_ADDRESS})")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per call (default 120)")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="one completion (base model unless --model names an adapter)")
    g.add_argument("prompt")
    g.add_argument("--model", default="", help="an adapter's name, or the base model's (default: the base)")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message, rendered with the "
                   "model's chat template")
    g.add_argument("--system", help="with --chat: a system message first")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="a stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print the whole result as JSON")
    sub.add_parser("models", help="the base model and every adapter")
    ld = sub.add_parser("load", help=f"register an adapter (admin: ${TOKEN_ENV})")
    ld.add_argument("name")
    ld.add_argument("source_uri", help="a directory, hf://org/repo[/sub][@rev], s3://bucket/prefix/")
    ld.add_argument("--base-model-name", default="")
    ld.add_argument("--inplace", action="store_true", help="replace the version the name serves")
    ul = sub.add_parser("unload", help=f"forget an adapter (admin: ${TOKEN_ENV})")
    ul.add_argument("name")
    return p


def _generate(c: Client, a: argparse.Namespace) -> None:
    params = {"max_tokens": a.max_tokens, "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
              "seed": a.seed, "stop": a.stop}
    prompt = a.prompt
    if a.chat:
        prompt = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": prompt}]
    if a.stream:
        for chunk in c.stream(prompt, model=a.model, **params):
            print(chunk.text, end="", flush=True)
        print()
        return
    out = c.generate(prompt, model=a.model, **params)
    if a.json:
        print(json.dumps(out.__dict__))
    else:
        print(out.text)


def _about(m) -> str:
    """An adapter's lineage, rank and version; a name nothing has loaded yet is listed without them."""
    if m.kind != "adapter":
        return ""
    if not m.content_hash:
        return f" of {m.parent} (not loaded yet: rank and version come with its first load)"
    return f" of {m.parent}, rank {m.rank}, {m.content_hash[:12]}"


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        with Client(a.address, timeout=a.timeout) as c:
            if a.command == "generate":
                _generate(c, a)
            elif a.command == "models":
                for m in c.models():
                    print(f"{m.id}  {m.kind}{_about(m)}")
            elif a.command == "load":
                m = c.load(a.name, a.source_uri, a.base_model_name, a.inplace)
                print(f"loaded {m.id} ({m.content_hash[:12]}, rank {m.rank}) on {m.parent}")
            elif a.command == "unload":
                c.unload(a.name)
                print(f"unloaded {a.name}")
    except LoRAServeError as e:
        print(f"loraserve: {e}", file=sys.stderr)
        return 1
    return 0
