"""Images in, the vision tower's input out: decoding with Pillow, then the reference's preprocessing
(transformers' `Qwen2VLImageProcessorPil`, as the checkpoint's `preprocessor_config.json` sets it up), step for
step and in the same number types, so that the pixel values are the reference's to the bit.

Decoding applies the EXIF orientation (a phone photo the right way up) and turns every mode into RGB as the
reference does (transparency composited onto white); 16-bit greyscale is scaled to 8 bits first (the reference
clips it to 255 instead). A file that is not an image, corrupt, truncated, or larger than `MAX_DECODED_PIXELS`
(a decompression bomb) is refused with `InvalidImage`."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from qwenlite.config import VisionConfig
from qwenlite.errors import InvalidImage, QwenliteError
from qwenlite.model.vision import ImageInput

PREPROCESSOR_FILE = "preprocessor_config.json"
MAX_DECODED_PIXELS = 64 << 20  # larger images are refused before decoding: 64 Mpx is 192 MB of RGB
MAX_ASPECT_RATIO = 200  # the reference refuses anything longer and thinner


def decode_image(data: bytes, name: str = "image") -> Image.Image:
    """Bytes of a PNG, JPEG, WebP, GIF (first frame), BMP, TIFF ... -> an RGB image, upright."""
    try:
        # Pillow only warns between its own limit and twice it; ours, below both, refuses before any decoding.
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            if w * h > MAX_DECODED_PIXELS:
                raise Image.DecompressionBombError(f"{w}x{h}")
            image = ImageOps.exif_transpose(image)  # loads the pixels
            return to_rgb(image)
    except Image.DecompressionBombError:
        raise InvalidImage(f"{name} has more than the {MAX_DECODED_PIXELS} pixels allowed") from None
    except UnidentifiedImageError as e:
        raise InvalidImage(f"{name} is not an image Pillow can read ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise InvalidImage(f"{name} is corrupt or truncated ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """As transformers' `convert_to_rgb`: transparency composited onto white, every other mode converted."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: the 8 high bits (Pillow's own conversion clips at 255).
        pixels = np.asarray(image).astype(np.float64).clip(0, 65535) / 257.0
        image = Image.fromarray(np.rint(pixels).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def data_url_bytes(url: str, max_bytes: int | None = None, kind: str = "image") -> bytes:
    """The bytes of a base64 `data:` URL (an image's, or a video's: `kind`), at most `max_bytes` of them."""
    a = "a" if kind == "video" else "an"
    header, comma, payload = url.partition(",")
    if not header.startswith("data:") or not comma or not header.endswith(";base64"):
        raise InvalidImage(f"{a} {kind} data URL must be base64: data:{kind}/...;base64,...")
    if max_bytes is not None and len(payload) > (max_bytes + 2) // 3 * 4:
        raise InvalidImage(f"the {kind} is larger than the {max_bytes} bytes allowed")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise InvalidImage(f"the {kind} data URL is not valid base64") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The reference's target size: both sides multiples of `factor`, the area within [min, max] pixels, the
    aspect ratio kept as well as that allows."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidImage(f"an image of {width}x{height} pixels is longer than {MAX_ASPECT_RATIO} times its width")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def processor_config(file: Path) -> dict | None:
    """A checkpoint's (video_)preprocessor_config.json, or None where it has none."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QwenliteError(f"cannot read {file}: {e}") from None


def tower_patch_sizes(vision: VisionConfig | None) -> dict:
    """Without a preprocessor file: the processor's defaults but the tower's patch sizes (all defaults without one)."""
    if vision is None:
        return {}
    return dict(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                merge_size=vision.spatial_merge_size)  # fmt: skip


@dataclass
class ImageProcessor:
    """`preprocessor_config.json`'s settings; the defaults are the published Qwen3.5 checkpoints' file."""

    min_pixels: int = 65536
    max_pixels: int = 16777216
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_dir(cls, path: str | Path, vision: VisionConfig | None = None) -> ImageProcessor:
        """The checkpoint's preprocessor_config.json; without one, the defaults with the tower's patch sizes."""
        raw = processor_config(Path(path) / PREPROCESSOR_FILE)
        if raw is None:
            return cls(**tower_patch_sizes(vision))
        # As Qwen2VLImageProcessorPil.__init__: `size` first, then min_pixels / max_pixels over it.
        size = raw.get("size") or {}
        fields = {
            "min_pixels": raw.get("min_pixels", size.get("shortest_edge")),
            "max_pixels": raw.get("max_pixels", size.get("longest_edge")),
            **{
                k: raw.get(k) for k in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "resample")
            },
            **{k: tuple(raw[k]) for k in ("image_mean", "image_std") if isinstance(raw.get(k), list)},
        }
        return cls(**{k: v for k, v in fields.items() if v is not None})

    def preprocess(self, image: Image.Image) -> ImageInput:
        """An RGB image -> patches (h * w, 3 * temporal_patch * P * P) in 2 x 2 merge-block order, and its grid."""
        P, m, Tp = self.patch_size, self.merge_size, self.temporal_patch_size
        height, width = smart_resize(image.height, image.width, P * m, self.min_pixels, self.max_pixels)
        resized = np.asarray(image.resize((width, height), resample=self.resample))  # (H, W, 3) uint8
        # The reference's arithmetic: rescale in float64 then float32, normalise in float32.
        pixels = (resized.astype(np.float64) * self.rescale_factor).astype(np.float32).transpose(2, 0, 1)
        mean, std = np.array(self.image_mean, dtype=np.float32), np.array(self.image_std, dtype=np.float32)
        pixels = ((pixels.T - mean) / std).T  # (3, H, W)
        gh, gw = height // P, width // P
        patches = pixels.reshape(3, gh // m, m, P, gw // m, m, P).transpose(1, 4, 2, 5, 0, 3, 6)
        patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], Tp, P, P))
        flat = np.ascontiguousarray(patches.reshape(gh * gw, 3 * Tp * P * P))
        digest = hashlib.blake2b(flat.tobytes(), digest_size=16).hexdigest()
        return ImageInput(torch.from_numpy(flat), (1, gh, gw), m, digest)

    def load(self, source: str | Path | bytes, name: str | None = None) -> ImageInput:
        """A file path or the bytes of an image -> the tower's input."""
        if isinstance(source, bytes):
            return self.preprocess(decode_image(source, name or "image"))
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InvalidImage(f"cannot read image {path}: {e.strerror or e}") from None
        return self.preprocess(decode_image(data, name or str(path)))


def expand_image_tokens(ids: Sequence[int], images: Sequence[ImageInput], image_token_id: int) -> list[int]:
    """Prompt ids with one `<|image_pad|>` per image (as the chat template writes them) -> each repeated as many
    times as its image has tokens."""
    count = sum(1 for i in ids if i == image_token_id)
    if count != len(images):
        raise QwenliteError(f"the prompt has {count} image placeholders for {len(images)} images")
    out: list[int] = []
    pending = iter(images)
    for i in ids:
        out += [i] * next(pending).tokens if i == image_token_id else [i]
    return out
