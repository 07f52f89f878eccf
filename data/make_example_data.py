"""Generate the example dataset in `data/`: data.txt, four JSON files, five JPEGs and one MP4.

    python data/make_example_data.py      # rewrites the files beside this script

The photos are scikit-image's bundled sample images (public domain or CC0, shipped inside the
scikit-image package, so nothing is downloaded); the video is a 4-second pan across the rocket
photo, encoded with PyAV. The conversations were written for this project and describe what the
pictures actually show.

Paths are relative to the file that names them (data.txt lists `text_only.json`, the JSON files
name `images/...` and `videos/...`), so the data validates from anywhere: run from `data/`, the
paths resolve against the current directory exactly as the official recipe resolves them; run
from elsewhere (e.g. `xc-prep validate data/data.txt` at the repository root), they resolve
against data.txt's and the JSON files' folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import skimage.data
from PIL import Image

DATA_DIR = Path(__file__).resolve().parent
JPEG_QUALITY = 85
VIDEO_SIZE = (320, 240)
VIDEO_FPS = 10
VIDEO_SECONDS = 4

# ---------------------------------------------------------------- media


def save_images(images_dir: Path) -> None:
    """Five photos as JPEG (~250 KB together)."""
    images_dir.mkdir(parents=True, exist_ok=True)
    photos = {
        "astronaut.jpg": skimage.data.astronaut(),  # 512×512
        "chelsea.jpg": skimage.data.chelsea(),  # 451×300
        "coffee.jpg": skimage.data.coffee(),  # 600×400
        "rocket.jpg": skimage.data.rocket(),  # 640×427
        "hubble.jpg": skimage.data.hubble_deep_field(),  # 1000×872, saved at 500×436
    }
    for name, pixels in photos.items():
        image = Image.fromarray(pixels)
        if image.width > 640:
            image = image.resize((image.width // 2, image.height // 2), Image.Resampling.LANCZOS)
        image.save(images_dir / name, quality=JPEG_QUALITY, optimize=True)


def save_video(path: Path) -> None:
    """A slow left-to-right pan across the rocket photo: 320×240, 10 fps, 4 s, H.264."""
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = VIDEO_SIZE
    photo = Image.fromarray(skimage.data.rocket()).resize((480, 320), Image.Resampling.LANCZOS)
    num_frames = VIDEO_FPS * VIDEO_SECONDS
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        # One thread and fixed options keep the file identical from run to run.
        stream.options = {"crf": "23", "preset": "medium", "threads": "1"}
        for i in range(num_frames):
            left = round(i * (photo.width - width) / (num_frames - 1))
            crop = np.asarray(photo.crop((left, 40, left + width, 40 + height)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(crop, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------- conversations


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    """Alternating user/assistant turns in the upstream format."""
    out = []
    for question, answer in pairs:
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


TEXT_ONLY = [
    {
        "id": "text-0",
        "conversations": turns(
            (
                "What does the hd_num setting control when fine-tuning InternLM-XComposer 2.5?",
                "It caps how many 560×560 local tiles an image is split into. The image is resized, "
                "keeping its aspect ratio, to fit a grid of at most hd_num tiles and padded with white "
                "to whole tiles; each tile then becomes about 400 tokens after the vision encoder and "
                "the 2×2 token merge, and a 560×560 global view of the whole image adds about 400 more. "
                "A larger hd_num keeps more detail but costs more tokens: at the default of 18, a single "
                "image can take close to 8,000 tokens.",
            )
        ),
    },
    {
        "id": "text-1",
        "conversations": turns(
            (
                "How is espresso different from drip coffee?",
                "Espresso is brewed by forcing hot water, at about 90–96 °C, through finely ground, "
                "tightly packed coffee at roughly 9 bar of pressure for 25–30 seconds. The result is a "
                "small, concentrated shot of about 30 ml with a layer of foam, the crema, on top. Drip "
                "coffee lets hot water run through coarser grounds by gravity alone over several "
                "minutes, which gives a larger cup with a lighter body.",
            ),
            (
                "So does a shot of espresso have more caffeine than a cup of drip coffee?",
                "Per millilitre, yes: espresso is far more concentrated. Per serving, usually not. A "
                "single shot holds roughly 60–75 mg of caffeine, while a 240 ml mug of drip coffee "
                "typically holds around 80–120 mg.",
            ),
        ),
    },
    {
        "id": "text-2",
        "conversations": turns(
            (
                "Write a haiku about a cat watching the rain.",
                "Grey rain on the glass\na cat follows each droplet\ntail twitching, then sleep",
            )
        ),
    },
]

SINGLE_IMAGE = [
    {
        "id": 0,
        "image": "images/astronaut.jpg",
        "conversations": turns(
            (
                "Describe this photo in detail.",
                "This is a formal studio portrait of an astronaut. A smiling woman with short, light "
                "brown hair wears an orange pressure suit; its metal neck ring is open, showing a dark "
                "collar underneath. A round, dark blue mission patch is sewn on the left side of her "
                "chest and a name tag on the right. In the lower right corner, in the foreground, sits "
                "her white helmet with a dark, reflective visor. Behind her, an American flag hangs on "
                "the left, and on the right stands a model of the Space Shuttle mounted on its orange "
                "external tank with two white booster rockets, all against a mottled grey backdrop.",
            )
        ),
    },
    {
        "id": 1,
        "image": "images/chelsea.jpg",
        "conversations": turns(
            (
                "What animal is this, and what colour are its eyes?",
                "It is a domestic cat, a short-haired tabby with tan and brown fur and darker stripes "
                "running over its forehead. Its eyes are a pale yellowish green with large, dark "
                "pupils. It also has a pinkish-orange nose and long white whiskers.",
            ),
            (
                "Is the cat looking straight into the camera?",
                "Not quite. The photo is a close-up of its face, but its gaze is directed slightly off "
                "to the left of the lens rather than straight into it. The background is out of focus.",
            ),
        ),
    },
    {
        "id": 2,
        "image": "images/coffee.jpg",
        "conversations": turns(
            (
                "What is in the cup, and what is it standing on?",
                "The cup holds a freshly made espresso with a layer of light brown crema on top. The "
                "cup is small, reddish-brown outside and white inside, and stands on a matching "
                "reddish-brown saucer with a metal teaspoon resting beside it. Everything sits on a "
                "worn wooden table in warm light.",
            )
        ),
    },
    {
        "id": 3,
        "image": "images/rocket.jpg",
        "conversations": turns(
            (
                "<ImageHere>\nAt what time of day was this photo taken, and what is happening?",
                "It was taken at dusk or just before dawn: the sky is a deep blue that lightens toward "
                "the horizon, and the floodlights around the pad are on, each with a star-shaped glare. "
                "A tall white rocket stands upright on its launch pad in the centre, between two thin "
                "masts, with a large steel lattice tower at each edge of the picture. There is no "
                "exhaust or flame, so the rocket is waiting on the pad, not launching.",
            )
        ),
    },
]

MULTI_IMAGE = [
    {
        "id": 0,
        "image": ["images/rocket.jpg", "images/hubble.jpg"],
        "conversations": turns(
            (
                "Image1: <ImageHere>; Image2: <ImageHere>. What do these two images have in common, "
                "and how do they differ?",
                "Both are about space, seen from opposite ends. Image1 is taken on the ground: a white "
                "rocket stands on its launch pad at dusk, surrounded by lattice towers, masts and "
                "floodlights. Image2 looks out into space: it is a deep-field view from a space "
                "telescope, a black sky scattered with thousands of small galaxies of different shapes "
                "and colours (spirals, reddish ellipticals, faint blue smudges) and a few nearby stars "
                "with sharp diffraction spikes.",
            ),
            (
                "Which image shows the more distant objects?",
                "Image2, by a huge margin. The rocket in Image1 is at most a few hundred metres from "
                "the camera, while the galaxies in Image2 are millions to billions of light-years "
                "away; the light from the faintest of them left them when the universe was young.",
            ),
        ),
    },
    {
        "id": 1,
        "image": ["images/astronaut.jpg", "images/chelsea.jpg", "images/coffee.jpg"],
        "conversations": turns(
            (
                "Image1: <ImageHere>; Image2: <ImageHere>; Image3: <ImageHere>. Which of these images "
                "shows a person?",
                "Only Image1: it is a portrait of a smiling astronaut in an orange pressure suit, with "
                "an American flag and a Space Shuttle model behind her. Image2 is a close-up of a "
                "tabby cat's face and Image3 shows a cup of espresso on a saucer.",
            ),
            (
                "Which colours dominate Image1 and Image3?",
                "Warm ones. In Image1 the orange suit fills most of the lower half of the frame. In "
                "Image3 the reddish-brown cup and saucer and the brown wooden table give the whole "
                "photo a warm, brown-orange tone, with the white inside of the cup as the brightest "
                "spot.",
            ),
        ),
    },
]

VIDEO = [
    {
        "id": "video-0",
        "image": "videos/rocket_pan.mp4",
        "conversations": turns(
            (
                "Describe what happens in this video.",
                "The clip lasts about four seconds and shows a rocket on its launch pad at dusk. The "
                "camera pans slowly from left to right. At the start, a steel lattice tower stands at "
                "the left edge, a thin mast rises in the middle, and the white rocket is on the right. "
                "As the view moves, the rocket drifts to the left side of the frame, and a second thin "
                "mast and another lattice tower come into view on the right. Nothing on the pad moves; "
                "only the camera does.",
            )
        ),
    },
]

SOURCES = {
    "text_only.json": (TEXT_ONLY, 0.02),
    "single_image.json": (SINGLE_IMAGE, 0.01),
    "multi_image.json": (MULTI_IMAGE, 0.01),
    "video.json": (VIDEO, 0.01),
}


def main(out_dir: Path = DATA_DIR) -> None:
    save_images(out_dir / "images")
    save_video(out_dir / "videos" / "rocket_pan.mp4")
    lines = []
    for name, (records, k) in SOURCES.items():
        (out_dir / name).write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
        lines.append(f"{name} {k}")
    (out_dir / "data.txt").write_text("\n".join(lines) + "\n")
    media = sorted(p for sub in ("images", "videos") for p in (out_dir / sub).iterdir())
    total = sum(p.stat().st_size for p in media)
    print(
        f"wrote {len(SOURCES)} JSON files, data.txt and {len(media)} media files ({total / 1024:.0f} KiB) to {out_dir}"
    )


if __name__ == "__main__":
    main()
