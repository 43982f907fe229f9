"""Serving with adapters, against a running router (`make run` starts one): the seed's serving workflows in
our gRPC shape, through the Python client.

    python examples/serving.py [--address 127.0.0.1:50051] [--adapters .demo/adapters]
    (admin steps need $LORASERVE_ADMIN_TOKEN, which `make run` prints)

1. adapters listed as models, each with its base model (vLLM's /v1/models);
2. requests to adapters pre-loaded on the worker (`--lora-modules sql-lora=path` and the JSON form
   {"name": "math-lora", "path": ..., "base_model_name": ...});
3. adapters loaded on their first request by a resolver: the filesystem (`<root>/<name>`) and the Hub;
4. runtime load and unload (admin, guarded by the token);
5. in-place reload: the same name, new weights; new requests get the new version (the content hash says so).
"""

from __future__ import annotations

import argparse
import os

from _common import ROOT

from loraserve_client import Client, LoRAServeError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=os.environ.get("LORASERVE_ADDRESS", "127.0.0.1:50051"))
    p.add_argument("--adapters", default=str(ROOT / ".demo" / "adapters"), help="the demo adapters (for loading)")
    args = p.parse_args()
    with Client(args.address) as c:
        print("1. models:")
        for m in c.models():
            print(f"   {m.id:22s} {m.kind:8s} {'of ' + m.parent if m.parent else ''}")

        print("2. pre-loaded adapters:")
        for name in ("sql-lora", "math-lora"):
            out = c.generate("Write a SQL query:", model=name, max_tokens=8, temperature=0)
            print(f"   {name}: {out.text!r} (served by {out.worker_id}, version {out.adapter_hash[:12]})")

        print("3. resolved on their first request:")
        for name in ("code-lora", "demo-org/chat-lora"):
            out = c.generate("def f(x):", model=name, max_tokens=8, temperature=0)
            print(f"   {name}: {out.text!r} (version {out.adapter_hash[:12]})")
        try:
            c.generate("x", model="no-such-adapter")
        except LoRAServeError as e:
            print(f"   no-such-adapter: {e.code.name}")

        print("4./5. runtime load, in-place reload, unload:")
        first = c.load("live-lora", f"{args.adapters}/chat-lora")
        v1 = c.generate("Hello", model="live-lora", max_tokens=6, temperature=0)
        second = c.load("live-lora", f"{args.adapters}/math-lora", inplace=True)
        v2 = c.generate("Hello", model="live-lora", max_tokens=6, temperature=0)
        print(f"   loaded live-lora {first.content_hash[:12]}, reloaded in place as {second.content_hash[:12]}")
        print(f"   before: {v1.adapter_hash[:12]} {v1.text!r}; after: {v2.adapter_hash[:12]} {v2.text!r}")
        assert v1.adapter_hash == first.content_hash and v2.adapter_hash == second.content_hash
        c.unload("live-lora")
        print(f"   unloaded; listed: {'live-lora' in {m.id for m in c.models()}}")


if __name__ == "__main__":
    main()
