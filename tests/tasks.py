"""Synthetic training tasks with a learnable rule, generated in the test (no data downloads)."""

from __future__ import annotations

import json
import random

# keyword -> answer. The prompt hides the keyword among filler words; held-out prompts use
# filler arrangements never seen in training, so only the rule answers them.
COLOURS = {
    "apple": "red",
    "sky": "blue",
    "grass": "green",
    "coal": "black",
    "snow": "white",
    "banana": "yellow",
}
FILLER = [
    "the",
    "a",
    "big",
    "small",
    "old",
    "new",
    "my",
    "your",
    "some",
    "this",
    "that",
    "one",
    "wet",
    "dry",
    "far",
]


def tiny_chat_jsonl(n: int) -> bytes:
    """``n`` minimal, valid supervised examples: for API tests that never train."""
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": str(i)}]})
        for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


def colour_prompt(rng: random.Random, keyword: str) -> str:
    words = rng.sample(FILLER, 3)
    words.insert(rng.randrange(4), keyword)
    return "Colour of " + " ".join(words) + "?"


def colour_examples(n: int, *, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    keys = list(COLOURS)
    return [(colour_prompt(rng, k), COLOURS[k]) for k in (keys[i % len(keys)] for i in range(n))]


def to_jsonl(pairs: list[tuple[str, str]], system: str | None = None) -> bytes:
    lines = []
    for prompt, answer in pairs:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
        lines.append(json.dumps({"messages": messages}))
    return ("\n".join(lines) + "\n").encode()


# ---------------------------------------------------------------- a picture task

SHAPE_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")


def shape_picture(rng: random.Random, colour: str, shape: str, size: int = 56) -> bytes:
    """A coloured shape at a random place and size on a random light, low-saturation background."""
    import io

    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(170, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = SHAPE_COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def person_photo() -> bytes:
    """A real photo of a person (scikit-image ships it), as JPEG: moderation skips it."""
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((256, 256)).save(buf, format="JPEG")
    return buf.getvalue()


def data_url(png: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def picture_examples(n: int, *, seed: int) -> list[tuple[bytes, str]]:
    """(picture, colour of the shape); the shape kind and background vary and do not matter."""
    rng = random.Random(seed)
    colours = list(SHAPE_COLOURS)
    return [
        (shape_picture(rng, colours[i % len(colours)], rng.choice(SHAPES)), colours[i % len(colours)])
        for i in range(n)
    ]


def picture_message(png: bytes, question: str = "What colour is the shape?", detail: str = "auto") -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": data_url(png), "detail": detail}},
        ],
    }


def picture_jsonl(pairs: list[tuple[bytes, str]]) -> bytes:
    lines = [
        json.dumps({"messages": [picture_message(png), {"role": "assistant", "content": answer}]})
        for png, answer in pairs
    ]
    return ("\n".join(lines) + "\n").encode()


# ---------------------------------------------------------------- two answer styles (for DPO)

ANIMALS = {"red": "cat", "green": "dog", "blue": "bird", "yellow": "fish"}
STYLE_FILLER = (
    "the a of to and in is it you that he was for on are with as his they be at one have this".split()
)


def style_prompt(rng: random.Random) -> tuple[str, str]:
    colour = rng.choice(sorted(ANIMALS))
    words = [rng.choice(STYLE_FILLER) for _ in range(rng.randint(2, 5))]
    words.insert(rng.randint(0, len(words)), colour)
    return " ".join(words) + "?", ANIMALS[colour]


def both_styles_jsonl(n: int, *, seed: int) -> bytes:
    """SFT data answering in lowercase and UPPERCASE equally often: the task, but no style."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt, answer = style_prompt(rng)
        pairs.append((prompt, answer.upper() if i % 2 else answer))
    return to_jsonl(pairs)


def preference_jsonl(n: int, *, seed: int) -> bytes:
    """DPO data: the same answer, UPPERCASE preferred over lowercase."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        prompt, answer = style_prompt(rng)
        lines.append(
            json.dumps(
                {
                    "input": {"messages": [{"role": "user", "content": prompt}]},
                    "preferred_output": [{"role": "assistant", "content": answer.upper()}],
                    "non_preferred_output": [{"role": "assistant", "content": answer}],
                }
            )
        )
    return ("\n".join(lines) + "\n").encode()


# ---------------------------------------------------------------- function calling (cookbook style)

# Shaped like the OpenAI cookbook's "Fine tuning for function calling" drone example: a long list of
# function definitions on every line, in the legacy format (``functions``, ``function_call``,
# ``role: "function"``) that OpenAI's fine-tuning accepted.
DRONE_FUNCTIONS = [
    {
        "name": name,
        "description": description,
        "parameters": {
            "type": "object",
            "properties": {
                arg: {
                    "type": "string",
                    "description": f"The {arg.replace('_', ' ')} for {name.replace('_', ' ')}",
                }
                for arg in args
            },
            "required": list(args),
        },
    }
    for name, description, args in [
        ("takeoff_drone", "Initiate the drone's takeoff sequence.", ("altitude",)),
        ("land_drone", "Land the drone at its current location or a specified landing point.", ("location",)),
        (
            "control_drone_movement",
            "Direct the drone's movement in a specific direction.",
            ("direction", "distance"),
        ),
        ("set_drone_speed", "Adjust the speed of the drone.", ("speed",)),
        ("control_camera", "Control the drone's camera to capture images or videos.", ("mode", "duration")),
        (
            "control_gimbal",
            "Adjust the drone's gimbal for camera stabilization and direction.",
            ("tilt", "pan"),
        ),
        ("set_drone_lighting", "Control the drone's lighting for visibility and signaling.", ("mode",)),
        ("return_to_home", "Command the drone to return to its home location.", ()),
        ("set_battery_saver_mode", "Toggle battery saver mode.", ("status",)),
        ("set_obstacle_avoidance", "Configure obstacle avoidance settings.", ("mode",)),
    ]
]
DRONE_COMMANDS = {
    "takeoff_drone": ("Take off to {x} metres", "altitude"),
    "land_drone": ("Land at the {x}", "location"),
    "set_drone_speed": ("Fly at speed {x}", "speed"),
    "control_camera": ("Switch the camera to {x}", "mode"),
}


def function_calling_records(n: int, *, seed: int) -> list[dict]:
    """Legacy-format supervised lines: a command -> an assistant ``function_call`` -> the function's
    result -> a short confirmation."""
    rng = random.Random(seed)
    names = list(DRONE_COMMANDS)
    records = []
    for i in range(n):
        name = names[i % len(names)]
        template, arg = DRONE_COMMANDS[name]
        value = f"{rng.choice(['home', 'roof', 'video', 'photo', 'field'])}-{i}"  # every line distinct
        records.append(
            {
                "functions": DRONE_FUNCTIONS,
                "messages": [
                    {"role": "system", "content": "You control a drone with the given functions."},
                    {"role": "user", "content": template.format(x=value)},
                    {
                        "role": "assistant",
                        "content": None,
                        "function_call": {"name": name, "arguments": json.dumps({arg: value})},
                    },
                    {"role": "function", "name": name, "content": json.dumps({"status": "ok"})},
                    {"role": "assistant", "content": "Done."},
                ],
            }
        )
    return records


def records_jsonl(records: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()
