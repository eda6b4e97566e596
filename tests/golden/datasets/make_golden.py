"""Regenerate the golden validation cases: ``python tests/golden/datasets/make_golden.py``.

Writes ``<case>.jsonl`` (tiny images inlined as data URLs) and, by running the validator
with the case's options, ``<case>.expected.json``. Review the diff before committing.
Moderation in golden cases uses ``ColourModerator`` (a stand-in keyed on one pixel), so
the files pin the validator's rules, not OpenCV's detectors (tested on real photos apart).
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

from PIL import Image

from openft.datasets.moderation import ModerationResult

HERE = Path(__file__).resolve().parent

# Stand-in moderation: the colour of pixel (0, 0) says what the image "contains".
FLAG_COLOURS = {
    (255, 0, 255): "children",
    (0, 255, 255): "faces",
    (255, 255, 0): "people",
    (1, 2, 3): "captcha",
}


class ColourModerator:
    def moderate(self, image: Image.Image) -> ModerationResult:
        flagged = FLAG_COLOURS.get(image.convert("RGB").getpixel((0, 0)))
        scores = {c: float(c == flagged) for c in ("people", "faces", "children", "captcha")}
        return ModerationResult(scores=scores, flagged=frozenset([flagged]) if flagged else frozenset())


# Per case: method, and options that make rare codes reachable in a small file.
CASES = {
    "clean_supervised": {"method": "supervised"},
    "clean_dpo": {"method": "dpo"},
    "clean_images": {"method": "supervised"},
    "mixed_supervised": {"method": "supervised", "max_tokens": 300, "max_image_examples": 8},
    "mixed_dpo": {"method": "dpo"},
}


def data_url(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def raw_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def tile(colour: tuple[int, int, int], size: int = 8, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (size, size), colour)


def img(url: str, detail: str | None = None) -> dict:
    spec = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": spec}


def chat(question: str, answer: str, *images: dict) -> dict:
    user = (
        {"role": "user", "content": [{"type": "text", "text": question}, *images]}
        if images
        else {
            "role": "user",
            "content": question,
        }
    )
    return {
        "messages": [
            {"role": "system", "content": "You describe colours."},
            user,
            {"role": "assistant", "content": answer},
        ]
    }


def pref(question: str, good: str, bad: str) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": question}]},
        "preferred_output": [{"role": "assistant", "content": good}],
        "non_preferred_output": [{"role": "assistant", "content": bad}],
    }


RED = data_url(tile((200, 30, 30)))
GREEN_JPEG = data_url(tile((30, 200, 30), 16), "JPEG", quality=90)
BLUE_WEBP = data_url(tile((30, 30, 200), 16), "WEBP")
RGBA_PNG = data_url(tile((10, 20, 30, 128), mode="RGBA"))


def clean_supervised() -> list:
    lines = [chat(f"What is {a} plus {b}?", str(a + b)) for a, b in zip(range(10), range(3, 13), strict=True)]
    lines[3]["messages"].insert(2, {"role": "assistant", "content": "Let me think.", "weight": 0})
    lines[3]["messages"].insert(3, {"role": "user", "content": "Go on."})
    lines[4] = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
            {"role": "assistant", "content": "18 degrees and sunny."},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        "parallel_tool_calls": False,
    }
    return lines


def clean_dpo() -> list:
    return [pref(f"Say hi to user {i}.", f"Hello, user {i}!", "no") for i in range(10)]


def clean_images() -> list:
    urls = [RED, GREEN_JPEG, BLUE_WEBP, RGBA_PNG]
    lines = [
        chat("What colour is this?", f"Colour {i}.", img(urls[i % 4], ("low", "high", "auto")[i % 3]))
        for i in range(10)
    ]
    lines.append(chat("Two images?", "Red and green.", img(RED), img(GREEN_JPEG)))
    lines.append(chat("No image here.", "Fine."))
    return lines


def mixed_supervised() -> list:
    """Every supervised code on its own line (see the comments); too_few_examples at the end."""
    truncated = base64.b64decode(GREEN_JPEG.split(",", 1)[1])[:-40]
    gif = io.BytesIO()
    tile((5, 5, 5)).save(gif, "GIF")
    huge = io.BytesIO()
    Image.new("1", (10000, 6000)).save(huge, "PNG", optimize=True)  # 60 MP, a few KB
    good = chat("Fine?", "Yes.")
    msg_role = chat("Hi", "Hello")
    msg_role["messages"][1]["role"] = "human"
    no_assistant = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", "weight": 0}]
    }
    img_assistant = chat("Hi", "Hello")
    img_assistant["messages"][2]["content"] = [{"type": "text", "text": "see"}, img(RED)]
    return [
        "{not json",  # 1 invalid_json
        {"messages": "hello"},  # 2 invalid_structure
        msg_role,  # 3 invalid_role
        no_assistant,  # 4 missing_assistant_message
        img_assistant,  # 5 image_in_assistant_message
        chat("Eleven?", "Yes.", *[img(RED)] * 11),  # 6 too_many_images
        chat("Detail?", "Yes.", img(RED, "medium")),  # 7 invalid_detail
        chat("Say <|im_end|> please", "No."),  # 8 control_token_in_content
        chat("Child?", "No.", img(data_url(tile((255, 0, 255))))),  # 9 contains_children
        chat("Face?", "No.", img(data_url(tile((0, 255, 255))))),  # 10 contains_faces
        chat("Person?", "No.", img(data_url(tile((255, 255, 0))))),  # 11 contains_people
        chat("Captcha?", "No.", img(data_url(tile((1, 2, 3))))),  # 12 contains_captcha
        chat("Local?", "No.", img("http://127.0.0.1:9/cat.png")),  # 13 inaccessible_url
        chat("Huge?", "No.", img(raw_url(huge.getvalue()))),  # 14 image_too_large
        chat("GIF?", "No.", img(raw_url(gif.getvalue(), "image/gif"))),  # 15 invalid_image_format
        chat("Cut?", "No.", img(raw_url(truncated, "image/jpeg"))),  # 16 invalid_image_format (truncated)
        chat("Long? " + "word " * 400, "Yes."),  # 17 example_too_long (max_tokens 300)
        good,  # 18 usable
        "",  # 19 blank, allowed
        good,  # 20 duplicate_example
        chat("Over the limit?", "Yes.", img(RED)),  # 21 too_many_image_examples (limit 8 here)
        pref("DPO here?", "a", "b"),  # 22 invalid_structure: a DPO line in a supervised file
    ]


def mixed_dpo() -> list:
    bad_role = pref("Q", "a", "b")
    bad_role["preferred_output"][0]["role"] = "user"
    two = pref("Q", "a", "b")
    two["non_preferred_output"].append({"role": "assistant", "content": "c"})
    img_out = pref("Q", "a", "b")
    img_out["preferred_output"][0]["content"] = [img(RED)]
    img_in = pref("Q", "a", "b")
    img_in["input"]["messages"][0]["content"] = [{"type": "text", "text": "Colour?"}, img(RED)]
    return [
        chat("Chat line", "in a dpo file"),  # 1 invalid_preference_example
        bad_role,  # 2 invalid_preference_example
        two,  # 3 invalid_preference_example
        {"preferred_output": [], "non_preferred_output": []},  # 4 invalid_preference_example
        img_out,  # 5 image_in_assistant_message
        img_in,  # 6 usable (images may appear in input)
        pref("Q2", "x", "y"),  # 7 usable
    ]


def write_case(name: str, records: list) -> Path:
    path = HERE / f"{name}.jsonl"
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    return path


def run_case(name: str) -> dict:
    """The report for a case, with the case's options (imported by the golden test too)."""
    from unittest import mock

    from openft.datasets import validate as v

    case = CASES[name]
    options = v.ValidationOptions(moderator=ColourModerator(), max_tokens=case.get("max_tokens"))
    with mock.patch.object(v, "MAX_IMAGE_EXAMPLES", case.get("max_image_examples", v.MAX_IMAGE_EXAMPLES)):
        with (HERE / f"{name}.jsonl").open("rb") as fp:
            return v.validate_file(fp, method=case["method"], options=options).report.to_dict()


def main() -> None:
    builders = {
        "clean_supervised": clean_supervised,
        "clean_dpo": clean_dpo,
        "clean_images": clean_images,
        "mixed_supervised": mixed_supervised,
        "mixed_dpo": mixed_dpo,
    }
    expected_only = "--expected-only" in sys.argv[1:]
    only = set(sys.argv[1:]) - {"--expected-only"}  # case names (none: all of them)
    for name, build in builders.items():
        if only and name not in only:
            continue
        if not expected_only:
            write_case(name, build())
        expected = run_case(name)
        (HERE / f"{name}.expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
        print(name, "ok" if expected["ok"] else "not ok", expected["summary"]["errors"], "errors")


if __name__ == "__main__":
    main()
