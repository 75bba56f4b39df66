"""The Qwen3.5 vision tower (`model.visual.*` in the published checkpoints), read against transformers'
`Qwen3_5VisionModel`, and the multimodal rotary positions of a prompt holding images (`get_rope_index`).

An image arrives as patches of 3 x 2 x P x P pixels (temporal patch 2: a still image is its own frame twice), in
2 x 2 merge-block order (io/images.py). The tower embeds each patch with one linear map, adds a learned position
table resampled to the image's grid, runs pre-norm blocks of full (non-causal) attention with 2-D rotary positions
and a GELU(tanh) MLP, then merges each 2 x 2 block into one vector of the text model's width: one
`<|image_pad|>` token. Attribute paths are the checkpoint's names under `model.visual.`.

A video is frames through the same tower, two frames to a temporal patch (`VideoInput`, grid t > 1); its tokens are
`<|video_pad|>`, one run per temporal patch with a `<t seconds>` label before it (io/video.py lays them out).

The text model then gives each token three rotary positions (t, h, w): equal for text, the grid coordinates for
image tokens, and text after an image continues from the image's largest position + 1, so a sequence's rope position
runs behind its token count by `rope_delta` from there on (negative: an image of N tokens advances it by its side).
Each temporal patch of a video is placed as an image of its own (the reference's `get_rope_index` splits the video's
grid into t grids of one frame): the labels between them are text. `embed_prompt` gives the text model a prompt's
embeddings, image and video features in place, and those positions.

The projections are the text model's `Linear`: a bf16 tower takes the same fp32 GEMM on CPUs whose bf16 GEMM is slow
(4-6x at these shapes, measured), and `set_fast(model, False)` gives the pure-torch reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwenlite.config import VisionConfig
from qwenlite.errors import QwenliteError
from qwenlite.model.qwen3_5 import Embedding, Linear, Qwen3_5ForCausalLM
from qwenlite.ops.rope import rope_inv_freq


@dataclass
class ImageInput:
    """One preprocessed image: what the tower reads, and what identifies it for prompt-state reuse."""

    pixel_values: torch.Tensor  # (t * h * w, C * temporal_patch * P * P) fp32, 2 x 2 merge-block order
    grid_thw: tuple[int, int, int]  # patches along time, height, width
    merge_size: int
    digest: str  # hash of the pixel values: equal images, equal digest

    @property
    def tokens(self) -> int:
        """Its `<|image_pad|>` tokens in the prompt."""
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size**2


@dataclass
class VideoInput:
    """One preprocessed video: its sampled frames as the tower reads them, and the time of each temporal patch."""

    pixel_values: torch.Tensor  # (t * h * w, C * temporal_patch * P * P) fp32, frame by frame in merge-block order
    grid_thw: tuple[int, int, int]  # t = temporal patches (frames / temporal_patch)
    merge_size: int
    digest: str  # hash of the pixel values: equal videos, equal digest
    timestamps: tuple[float, ...]  # seconds, one per temporal patch: the middle of its first and last frame

    @property
    def tokens(self) -> int:
        """Its `<|video_pad|>` tokens in the prompt, all temporal patches together."""
        t, h, w = self.grid_thw
        return t * h * w // self.merge_size**2


class PatchEmbed(nn.Module):
    """A Conv3d with stride = kernel over one patch is a linear map of the flattened patch: computed as one, in fp32
    and rounded once as the reference's GEMM does (torch's bf16 GEMM is slow on many CPUs)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel, stride=kernel, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.proj.weight, self.proj.bias
        x = x.to(w.dtype).float()  # the pixels rounded to the weights' dtype first, as the reference
        return F.linear(x, w.reshape(w.shape[0], -1).float(), b.float()).to(w.dtype)  # (N, D)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = Linear(c.hidden_size, 3 * c.hidden_size, bias=True)
        self.proj = Linear(c.hidden_size, c.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """x (N, D); cos / sin (N, head_dim) fp32 (`signed_sin`'s); attention within each frame of `lengths`
        patches, not across."""
        N, D = x.shape
        qkv = self.qkv(x).reshape(N, 3, self.num_heads, -1).permute(1, 2, 0, 3)  # (3, H, N, Dh)
        # q and k rotated together in fp32, as the reference rotates each, and rounded back (contiguous, as the
        # attention reads them fastest).
        qk = rotate(qkv[:2].float(), cos, sin).to(x.dtype, memory_format=torch.contiguous_format)  # (2, H, N, Dh)
        q, k, v = qk[0][None], qk[1][None], qkv[2][None]  # each (1, H, N, Dh)
        # 4-D: torch's CPU flash attention takes it (3-D inputs fall back to the N x N math path, 3x slower).
        out = [
            F.scaled_dot_product_attention(qs, ks, vs)
            for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
        ]
        out = out[0] if len(out) == 1 else torch.cat(out, 2)
        return self.proj(out[0].transpose(0, 1).reshape(N, D))


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin (..., R) -> its first half negated: what `rotate` takes, so that no rotated half needs negating."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """ops.rope.apply_rope over all of x's last dimension with sin = `signed_sin(sin)`: x * cos + [x2, x1] * sin,
    the same numbers as x * cos + [-x2, x1] * sin (negation is exact), in fewer passes over x."""
    x1, x2 = x.chunk(2, -1)
    return (x * cos).add_(torch.cat([x2, x1], -1).mul_(sin))


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.linear_fc1 = Linear(c.hidden_size, c.intermediate_size, bias=True)
        self.linear_fc2 = Linear(c.intermediate_size, c.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.attn = VisionAttention(c)
        self.mlp = VisionMLP(c)

    def forward(self, x, cos, sin, lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each 2 x 2 block of patches (consecutive in merge-block order) concatenated and
    mapped to the text width by an MLP with exact GELU."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.merged = c.hidden_size * c.spatial_merge_size**2
        self.norm = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.linear_fc1 = Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = Linear(self.merged, c.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def merge_block_order(grid: torch.Tensor, m: int) -> torch.Tensor:
    """(h, w, ...) in raster order -> (h * w, ...) in m x m block order: the order io/images.py lays patches in."""
    h, w = grid.shape[:2]
    blocks = grid.reshape(h // m, m, w // m, m, *grid.shape[2:]).transpose(1, 2)
    return blocks.reshape(h * w, *grid.shape[2:])


class VisionModel(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.pos_embed = Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c)
        self.init_rope()

    def init_rope(self, device: torch.device | str | None = None) -> None:
        """2-D rotary: head_dim / 4 frequencies, used for the row and again for the column (a model built on the
        meta device has none until this runs)."""
        head_dim = self.config.hidden_size // self.config.num_heads
        inv_freq = rope_inv_freq(head_dim // 2, self.config.rope_theta)
        self.register_buffer("inv_freq", inv_freq.to(device) if device else inv_freq, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.weight.dtype

    def grid_embeddings(self, t: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's position embeddings (t*h*w, D) and rotary cos, sin (t*h*w, head_dim) fp32, in patch order
        (sin as `signed_sin` gives it)."""
        m, side = self.config.spatial_merge_size, int(self.config.num_position_embeddings**0.5)
        table = self.pos_embed.weight.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        # The learned side x side table resampled to h x w (bilinear, corners aligned), in fp32 as the reference.
        grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)  # (h, w, D)
        pos = merge_block_order(grid, m).to(self.dtype).repeat(t, 1)
        rows = torch.arange(h, device=table.device)[:, None].expand(h, w)
        cols = torch.arange(w, device=table.device)[None, :].expand(h, w)
        rc = merge_block_order(torch.stack([rows, cols], -1), m).repeat(t, 1)  # (t*h*w, 2)
        freqs = (rc[..., None].float() * self.inv_freq).flatten(1)  # (t*h*w, head_dim / 2): [row | column]
        emb = torch.cat([freqs, freqs], -1)
        return pos, emb.cos(), signed_sin(emb.sin())

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """pixel_values (N, C * 2 * P * P) of the images with these (t, h, w) patch grids -> (N / 4, out_hidden)."""
        x = self.patch_embed(pixel_values)  # (N, D)
        parts = [self.grid_embeddings(*g) for g in grids]
        pos, cos, sin = (torch.cat(p) for p in zip(*parts, strict=True))
        x = x + pos
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # attention within a frame
        for block in self.blocks:
            x = block(x, cos, sin, lengths)
        return self.merger(x)


def vision_runs(inputs: Sequence[ImageInput | VideoInput], image_token_id: int, video_token_id: int | None):
    """The prompt's runs of pad tokens that `inputs` fill, in order: (pad token, merged grid (t, h, w), input number).
    An image is one run; a video is one run per temporal patch, each a grid of one frame (the reference's split)."""
    for k, item in enumerate(inputs):
        t, h, w = item.grid_thw
        h, w = h // item.merge_size, w // item.merge_size
        if isinstance(item, VideoInput):
            if video_token_id is None:
                raise QwenliteError("this model reads no videos: its config has no video_token_id")
            yield from ((video_token_id, (1, h, w), k) for _ in range(t))
        else:
            yield image_token_id, (t, h, w), k


def mrope_positions(
    ids: Sequence[int],
    images: Sequence[ImageInput | VideoInput],
    image_token_id: int,
    video_token_id: int | None = None,
) -> tuple[torch.Tensor, int]:
    """The three rotary position streams (3, T) of a prompt whose `<|image_pad|>` / `<|video_pad|>` runs hold `images`
    (images and videos, in prompt order), and its rope delta (the next position minus T). Text advances all three by
    one per token; a run's tokens sit at (start + frame, start + row, start + column) of its merged grid, and the text
    after it starts at start + its longer side."""
    pads = {image_token_id, video_token_id} - {None}
    runs = vision_runs(images, image_token_id, video_token_id)
    names = {image_token_id: "<|image_pad|>", video_token_id: "<|video_pad|>"}
    ids, out, pos, i = list(ids), [], 0, 0
    while i < len(ids):
        if ids[i] not in pads:
            j = i
            while j < len(ids) and ids[j] not in pads:
                j += 1
            out.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos, i = pos + j - i, j
            continue
        token, (t, h, w), k = next(runs, (None, (0, 0, 0), len(images)))
        if token is None:
            raise QwenliteError(
                "the prompt has more <|image_pad|> / <|video_pad|> tokens than its images and videos need"
            )
        n = t * h * w
        if ids[i : i + n] != [token] * n:
            what = "video" if token == video_token_id else "image"
            raise QwenliteError(f"{what} {k + 1} needs {n} {names[token]} tokens in a row in the prompt")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        out.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos, i = pos + max(h, w), i + n
    rest = next(runs, None)
    if rest is not None:
        raise QwenliteError(
            f"{len(images)} images and videos but <|image_pad|> / <|video_pad|> tokens for {rest[2]} in the prompt"
        )
    positions = torch.cat(out, 1) if out else torch.zeros(3, 0, dtype=torch.long)
    return positions, pos - len(ids)


def embed_prompt(
    model: Qwen3_5ForCausalLM, ids: Sequence[int], images: Sequence[ImageInput | VideoInput], start: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A prompt whose `<|image_pad|>` / `<|video_pad|>` runs hold `images` (images and videos in prompt order) -> the
    input embeddings (1, T - start, hidden) and rotary positions (3, T - start) of its tokens from `start` on, each
    run replaced by its features, and the prompt's rope delta: what `model`'s forward takes for it. Only inputs that
    reach past `start` are encoded: a restored prefix needs none of the others."""
    c = model.config
    if model.visual is None or c.image_token_id is None:
        raise QwenliteError(
            "this model reads no images: it has no vision tower (a text-only checkpoint, or a GGUF file loaded "
            "without its mmproj)"
        )
    positions, delta = mrope_positions(ids, images, c.image_token_id, c.video_token_id)
    device = model.device
    input_ids = torch.tensor([list(ids[start:])], device=device)
    embeds = model.model.embed_tokens(input_ids)
    ends = torch.tensor([0, *(i.tokens for i in images)]).cumsum(0)  # where each input's pads end, among all pads
    pad = (input_ids[0] == c.image_token_id) | (input_ids[0] == (c.video_token_id or -1))
    where = pad.nonzero()[:, 0]  # pad tokens from `start` on
    skipped = int(ends[-1]) - len(where)  # pad tokens before `start`
    wanted = [i for i in range(len(images)) if ends[i + 1] > skipped]
    if wanted:
        chosen = [images[i] for i in wanted]
        pixels = torch.cat([i.pixel_values for i in chosen]).to(device)
        features = model.visual(pixels, [i.grid_thw for i in chosen])  # (tokens, hidden)
        embeds[0, where] = features[skipped - int(ends[wanted[0]]) :].to(embeds.dtype)
    return embeds, positions[:, start:].to(device), delta
