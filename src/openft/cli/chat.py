"""``openft chat MODEL [PROMPT]``: one chat completion from a base, fine-tuned or checkpoint model."""

from __future__ import annotations

import base64
import mimetypes
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from openft.cli.remote import DEFAULT_BASE_URL, ApiKeyOption, BaseUrlOption, connect, print_json

_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
}


def chat(
    model: Annotated[str, typer.Argument(help="Model id: a base model, ft:... or ft:...:ckpt-step-N.")],
    prompt: Annotated[str | None, typer.Argument(help="The message; read from stdin when omitted.")] = None,
    image: Annotated[
        list[str] | None,
        typer.Option("--image", "-i", metavar="PATH|URL", help="Image file or URL to attach (repeatable)."),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System message.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Reply length limit.")] = None,
    temperature: Annotated[
        float | None, typer.Option(min=0, max=2, help="0 is greedy and deterministic (default: 1).")
    ] = None,
    no_stream: Annotated[
        bool, typer.Option("--no-stream", help="Print the reply only when complete.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the whole chat.completion as JSON (implies --no-stream).")
    ] = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Send PROMPT (and images) to MODEL and stream the reply to stdout."""
    if prompt is None:
        if sys.stdin.isatty():
            raise typer.BadParameter("give a PROMPT or pipe one on stdin", param_hint="PROMPT")
        prompt = sys.stdin.read()
    if not prompt.strip() and not image:
        raise typer.BadParameter("the prompt is empty", param_hint="PROMPT")
    content: str | list[dict[str, Any]] = prompt
    if image:
        content = [{"type": "text", "text": prompt}] + [
            {"type": "image_url", "image_url": {"url": image_url(i)}} for i in image
        ]
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    params: dict[str, Any] = {"model": model, "messages": messages}
    if max_tokens is not None:
        params["max_completion_tokens"] = max_tokens
    if temperature is not None:
        params["temperature"] = temperature

    with connect(base_url, api_key) as client:
        if json_out:
            print_json(client.chat.completions.create(**params))
            return
        if no_stream:
            reply = client.chat.completions.create(**params)
            typer.echo(reply.choices[0].message.content or "")
            return
        for chunk in client.chat.completions.create(**params, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                sys.stdout.write(chunk.choices[0].delta.content)
                sys.stdout.flush()
        sys.stdout.write("\n")


def image_url(value: str) -> str:
    """URLs (http, https, data) pass through; a local file becomes a data URL."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    path = Path(value)
    if not path.is_file():
        raise typer.BadParameter(f"no such file: {value}", param_hint="--image")
    data = path.read_bytes()
    mime = next((m for magic, m in _MAGIC.items() if data.startswith(magic)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    mime = mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
