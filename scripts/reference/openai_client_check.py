#!/usr/bin/env python3
"""The real `openai` Python client against a running `s2lc serve`.

    python scripts/reference/openai_client_check.py --base-url http://127.0.0.1:PORT/v1 \
        --model smollm2 --adapter alice@^1

Lists the models, runs a completion with and without the adapter, a chat completion, a streamed
completion (its pieces must add up to the non-streamed text), and an unknown adapter (the client
must raise NotFoundError carrying the server's message). Prints one JSON summary line; exits 1 on
the first check that fails. Needs only `openai` (pip install openai); run by
crates/s2lc/tests/serve.rs when the Python it finds can import it.
"""
import argparse
import json
import sys

import openai


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)
    summary = {"openai_version": openai.__version__}

    def check(ok: bool, what: str) -> None:
        if not ok:
            print(json.dumps({"failed": what, **summary}))
            sys.exit(1)

    ids = [m.id for m in client.models.list().data]
    summary["models"] = ids
    check(args.model in ids, "the base model is listed")
    check(any(i.startswith(args.model + ":") for i in ids), "an adapter is listed")

    prompt = "Alice was beginning to get very tired of"
    adapted = f"{args.model}:{args.adapter}"
    r = client.completions.create(model=adapted, prompt=prompt, max_tokens=12, temperature=0)
    text = r.choices[0].text
    summary["adapter_text"] = text
    check(r.model.startswith(args.model + ":"), "the response names the resolved adapter")
    check(r.usage is not None and r.usage.completion_tokens <= 12, "usage is reported")

    base = client.completions.create(model=args.model, prompt=prompt, max_tokens=12, temperature=0)
    summary["base_text"] = base.choices[0].text

    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model=adapted, prompt=prompt, max_tokens=12, temperature=0, stream=True
        )
    ]
    check("".join(pieces) == text, "streamed pieces add up to the completion")

    chat = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
    )
    summary["chat"] = chat.choices[0].message.content
    check(isinstance(chat.choices[0].message.content, str), "chat returns a message")

    try:
        client.completions.create(model=f"{args.model}:nobody@1.0.0", prompt="hi", max_tokens=2)
        check(False, "an unknown adapter raises")
    except openai.NotFoundError as e:
        summary["not_found"] = str(e)
        check("no adapter 'nobody'" in str(e), "the error names the adapter")

    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
