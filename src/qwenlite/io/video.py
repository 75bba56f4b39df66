"""Videos in, the vision tower's input out: decoding with PyAV, then the reference's frame sampling and
preprocessing (transformers' `Qwen3VLVideoProcessor`, which Qwen3.5 uses, as the checkpoint's
`video_preprocessor_config.json` sets it up, with its PyAV reader), step for step and in the same number types, so
that the pixel values are the reference's to the bit.

Sampling: `fps` frames per second of the stream's length (its frame count over its average rate), at least
`min_frames`, at most `max_frames` and the frames there are, spread evenly from the first frame to the last. The
frames are resized together (one size for all, the pixel budget shared by every frame), rescaled, normalised and cut
into patches of `temporal_patch_size` frames (the last frame repeated to fill the last patch). The prompt then holds,
per temporal patch, `<t seconds>` (the middle of its first and last frame) and a run of `<|video_pad|>` tokens between
`<|vision_start|>` and `<|vision_end|>` (`expand_video_tokens`), as the reference's processor writes it.

PyAV is optional (`pip install 'qwenlite[video]'`): imported only when a video is read. A file that is not a video,
corrupt, truncated, without frames, longer than `MAX_VIDEO_FRAMES` or with frames larger than `MAX_FRAME_PIXELS` is
refused with `InvalidVideo`."""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qwenlite.config import ModelConfig, VisionConfig
from qwenlite.errors import InvalidVideo, QwenliteError
from qwenlite.io.images import MAX_ASPECT_RATIO, expand_image_tokens, processor_config, tower_patch_sizes
from qwenlite.model.vision import ImageInput, VideoInput
from qwenlite.text.tokenizer import Tokenizer

VIDEO_PREPROCESSOR_FILE = "video_preprocessor_config.json"
MAX_VIDEO_FRAMES = 1 << 17  # frames decoded at most: over an hour at 30 frames per second
MAX_FRAME_PIXELS = 16 << 20  # a frame larger than 16 Mpx (4K is 8.3) is refused before decoding
BICUBIC = 3  # PIL's number, as the config files write it; the only resampling the Qwen3.5 files use


def smart_resize(
    frames: int, height: int, width: int, temporal: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The reference's frame size for a video: both sides multiples of `factor`, the pixels of all its frames
    (rounded to whole temporal patches) within [min, max], the aspect ratio kept as well as that allows."""
    if height < factor or width < factor:  # too small a side is scaled up to one factor first
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InvalidVideo(f"a video of {width}x{height} pixels is longer than {MAX_ASPECT_RATIO} times its width")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(frames / temporal) * temporal
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def import_av():
    try:
        import av
    except ImportError:
        raise QwenliteError("reading videos needs PyAV: pip install 'qwenlite[video]'") from None
    return av


@dataclass
class VideoProcessor:
    """`video_preprocessor_config.json`'s settings; the defaults are transformers' `Qwen3VLVideoProcessor`'s."""

    min_pixels: int = 128 * 32 * 32  # size.shortest_edge: pixels of all frames together
    max_pixels: int = 32 * 32 * 768  # size.longest_edge
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC
    fps: float | None = 2
    num_frames: int | None = None  # a fixed number of frames instead of `fps`
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = True
    cap_pixels_per_frame: bool = False  # the reference's default until it changes (it warns about it)
    max_video_tokens: int = 768

    def __post_init__(self) -> None:
        if self.resample != BICUBIC:
            raise QwenliteError(f"video resampling {self.resample} is not supported (only bicubic, {BICUBIC})")

    @classmethod
    def from_dir(cls, path: str | Path, vision: VisionConfig | None = None) -> VideoProcessor:
        """The checkpoint's video_preprocessor_config.json; without one, the defaults with the tower's patch sizes."""
        raw = processor_config(Path(path) / VIDEO_PREPROCESSOR_FILE)
        if raw is None:
            return cls(**tower_patch_sizes(vision))
        size = raw.get("size") or {}
        plain = ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "resample", "min_frames",
                 "max_frames", "do_sample_frames", "cap_pixels_per_frame", "max_video_tokens")  # fmt: skip
        fields = {
            "min_pixels": size.get("shortest_edge"),
            "max_pixels": size.get("longest_edge"),
            **{k: raw.get(k) for k in plain},
            **{k: tuple(raw[k]) for k in ("image_mean", "image_std") if isinstance(raw.get(k), list)},
        }
        out = cls(**{k: v for k, v in fields.items() if v is not None})
        # `fps` and `num_frames` exclude each other: a file that sets num_frames samples that many.
        out.num_frames = raw.get("num_frames")
        out.fps = None if out.num_frames is not None else raw.get("fps", out.fps)
        return out

    def sample_indices(self, total: int, video_fps: float | None) -> np.ndarray:
        """Which of `total` frames to keep (the reference's `sample_frames`)."""
        if not self.do_sample_frames:
            return np.arange(total)
        n = self.num_frames
        if n is None:
            n = int(total / (video_fps or 24) * self.fps)
            n = min(max(n, self.min_frames), self.max_frames, total)
        return np.linspace(0, total - 1, n).round().astype(int)

    def frame_size(self, frames: int, height: int, width: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:  # qwen-vl-utils' cap: a short clip spends no more per frame than a long one
            per_frame = max(
                min(self.max_video_tokens * factor**2, self.max_pixels // frames), int(self.min_pixels * 1.05)
            )
            max_pixels = per_frame * frames
        return smart_resize(frames, height, width, self.temporal_patch_size, factor, self.min_pixels, max_pixels)

    def decode(self, data: bytes, name: str = "video") -> tuple[torch.Tensor, np.ndarray, float]:
        """Bytes of a video file -> its sampled frames resized (N, 3, H, W) uint8, which frames they are, and the
        stream's frame rate. Frames are resized as they are decoded: a long video never sits in memory whole."""
        av = import_av()
        opened = False
        try:
            with av.open(io.BytesIO(data)) as container:
                opened = True
                if not container.streams.video:
                    raise InvalidVideo(f"{name} has no video stream")
                stream = container.streams.video[0]
                total = stream.frames or count_frames(av, data)
                if total == 0:
                    raise InvalidVideo(f"{name} has no frames")
                if total > MAX_VIDEO_FRAMES:
                    raise InvalidVideo(f"{name} has {total} frames, more than the {MAX_VIDEO_FRAMES} allowed")
                if stream.width * stream.height > MAX_FRAME_PIXELS:
                    raise InvalidVideo(f"{name} has frames of {stream.width}x{stream.height}, more than the "
                                       f"{MAX_FRAME_PIXELS} pixels allowed")  # fmt: skip
                fps = float(stream.average_rate) if stream.average_rate else 24.0
                indices = self.sample_indices(total, fps)
                if len(indices) < self.temporal_patch_size:
                    raise InvalidVideo(
                        f"{name} has {total} frame(s); a video needs at least {self.temporal_patch_size}"
                    )
                counts = np.bincount(indices)  # how often each frame is kept (more than once: num_frames > total)
                frames, size = [], None
                for i, frame in enumerate(container.decode(stream)):
                    if i >= len(counts):
                        break
                    if not counts[i]:
                        continue
                    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None].contiguous()
                    if size is None:
                        source = rgb.shape[-2:]
                        size = self.frame_size(len(indices), *source)
                    elif rgb.shape[-2:] != source:
                        raise InvalidVideo(f"{name} changes its frame size mid-stream")
                    if tuple(size) != tuple(source):
                        # As torchvision's resize of uint8 frames on the CPU: antialiased bicubic, in uint8.
                        rgb = F.interpolate(rgb, size=size, mode="bicubic", align_corners=False, antialias=True)
                    frames += [rgb] * int(counts[i])
        except InvalidVideo:
            raise
        except av.error.FFmpegError as e:  # not a container PyAV knows, or data it cannot decode
            what = "is corrupt or truncated" if opened else "is not a video PyAV can read"
            raise InvalidVideo(f"{name} {what} ({one_line(e)})") from None
        if len(frames) < len(indices):
            raise InvalidVideo(f"{name} is truncated: {len(frames)} of the {len(indices)} frames sampled decode")
        return torch.cat(frames), indices, fps

    def preprocess(self, frames: torch.Tensor, indices: Sequence[int], fps: float) -> VideoInput:
        """Sampled, resized frames (N, 3, H, W) uint8 -> patches (t * h * w, 3 * temporal_patch * P * P), frame by
        frame in 2 x 2 merge-block order, the grid and each temporal patch's time."""
        P, m, Tp = self.patch_size, self.merge_size, self.temporal_patch_size
        # The reference's fused rescale and normalise: (x - mean / rescale) / (std / rescale), in float32.
        mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
        pixels = (frames.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        if pad := -len(pixels) % Tp:
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
        N, C, H, W = pixels.shape
        gt, gh, gw = N // Tp, H // P, W // P
        patches = pixels.view(gt, Tp, C, gh // m, m, P, gw // m, m, P).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = patches.reshape(gt * gh * gw, C * Tp * P * P).contiguous()
        digest = hashlib.blake2b(flat.numpy().tobytes(), digest_size=16).hexdigest()
        return VideoInput(flat, (gt, gh, gw), m, digest, frame_times(indices, fps, Tp))

    def load(self, source: str | Path | bytes, name: str | None = None) -> VideoInput:
        """A file path or the bytes of a video -> the tower's input."""
        if isinstance(source, bytes):
            return self.preprocess(*self.decode(source, name or "video"))
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InvalidVideo(f"cannot read video {path}: {e.strerror or e}") from None
        return self.preprocess(*self.decode(data, name or str(path)))


def count_frames(av, data: bytes) -> int:
    """Frames of a stream whose container does not say: its packets, counted without decoding them."""
    with av.open(io.BytesIO(data)) as container:
        n = 0
        for packet in container.demux(container.streams.video[0]):
            n += packet.size > 0
            if n > MAX_VIDEO_FRAMES:
                break
        return n


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def frame_times(indices: Sequence[int], fps: float, temporal_patch_size: int) -> tuple[float, ...]:
    """Each temporal patch's time in seconds: the middle of its first and last frame (the last frame repeated to
    fill the last patch), as the reference's processor labels them."""
    indices = [int(i) for i in indices]
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
    seconds = [i / fps for i in indices]
    Tp = temporal_patch_size
    return tuple((seconds[i] + seconds[i + Tp - 1]) / 2 for i in range(0, len(seconds), Tp))


def expand_video_tokens(
    ids: Sequence[int], videos: Sequence[VideoInput], tok: Tokenizer, video_token_id: int
) -> list[int]:
    """Prompt ids with one `<|video_pad|>` per video (as the chat template writes them) -> each replaced, as the
    reference's processor does, by `<t seconds><|vision_start|><|video_pad|> * n<|vision_end|>` per temporal patch."""
    count = sum(1 for i in ids if i == video_token_id)
    if count != len(videos):
        raise QwenliteError(f"the prompt has {count} video placeholders for {len(videos)} videos")
    start, end = tok.token_to_id("<|vision_start|>"), tok.token_to_id("<|vision_end|>")
    out: list[int] = []
    pending = iter(videos)
    for i in ids:
        if i != video_token_id:
            out.append(i)
            continue
        video = next(pending)
        t, h, w = video.grid_thw
        run = [video_token_id] * (h * w // video.merge_size**2)
        for seconds in video.timestamps:
            # The label sits between control tokens, so it encodes alone as it does inside the whole text.
            out += [*tok.encode_plain(f"<{seconds:.1f} seconds>"), start, *run, end]
    return out


def expand_vision_tokens(
    ids: Sequence[int], inputs: Sequence[ImageInput | VideoInput], tok: Tokenizer, config: ModelConfig
) -> list[int]:
    """Prompt ids with one placeholder per image and video part -> each expanded for its input (`inputs`, images
    and videos in the prompt's order: the order the model takes them in)."""
    images = [i for i in inputs if not isinstance(i, VideoInput)]
    videos = [v for v in inputs if isinstance(v, VideoInput)]
    ids = expand_image_tokens(ids, images, config.image_token_id) if images else list(ids)
    if videos and config.video_token_id is None:
        raise QwenliteError("this model reads no videos: its config has no video_token_id")
    return expand_video_tokens(ids, videos, tok, config.video_token_id) if videos else ids
