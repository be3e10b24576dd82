"""A synthetic world small enough to train an SD1.5-shaped UNet on a CPU.

Scenes are rendered directly as 4-channel 16x16 "latents" (no VAE):

- a *background* named by the caption ("beach", "forest", ...), each with its own layout
  (horizon, stripes, blocks, gradient) and colours: the context the prior must keep;
- one *object* of a class named by the caption ("ball", "box", "kite": disc, square, diamond),
  at a random place and size, with its instance mask;
- the object's *identity*: a colour pair and a texture pattern (split, horizontal stripes,
  vertical stripes, checker) -- continuous colours, so there are unboundedly many identities
  and the ones used for evaluation are never seen in training.

Captions are token lists; each word has a fixed random 768-d embedding (a stand-in for the
text encoder), so the base model learns background and class from the caption but can only
guess an identity: only the image feature of a reference can tell it which one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SIZE = 16                                   # latent side
CHANNELS = 4
CONTEXT_LEN = 8                             # tokens per caption (padded)
EMBED_DIM = 768
BACKGROUNDS = ("beach", "forest", "city", "snow", "desert", "night")
CLASSES = ("ball", "box", "kite")
PATTERNS = ("split", "hstripes", "vstripes", "checker")
CLASS_POSITION = 2                          # "<bos> a {class} in the {background} <eos> <pad>"
WORLD_SEED = 1234                           # fixes word embeddings and background colours
NOISE = 0.05                                # per-pixel render noise
#: colours are scaled so a scene's latent has a standard deviation near 1, as SD1.5's scaled
#: latents do: SD1.5's noise schedule assumes that variance, and a smaller one throws the base
#: model's x0 estimate at t=999 far off, so samples from noise stay noise
COLOUR_NORM = 2.8


@dataclass(frozen=True)
class Identity:
    cls: str
    colour_a: tuple[float, ...]
    colour_b: tuple[float, ...]
    pattern: str


@dataclass
class Scene:
    latent: torch.Tensor      # [4, 16, 16]
    mask: torch.Tensor        # [16, 16] in [0, 1]
    background: str
    identity: Identity
    tokens: list[str]


def _world_generator() -> torch.Generator:
    return torch.Generator().manual_seed(WORLD_SEED)


def _vocab() -> list[str]:
    return ["<bos>", "<eos>", "<pad>", "a", "in", "the", *CLASSES, *BACKGROUNDS]


_EMBEDDINGS: dict[str, torch.Tensor] | None = None
_TEMPLATES: dict[str, torch.Tensor] | None = None


def word_embeddings() -> dict[str, torch.Tensor]:
    """A fixed random 768-d vector per word (unit variance per entry) plus a small fixed
    position code, so repeated filler words still differ by place."""
    global _EMBEDDINGS
    if _EMBEDDINGS is None:
        g = _world_generator()
        _EMBEDDINGS = {w: torch.randn(EMBED_DIM, generator=g) for w in _vocab()}
    return _EMBEDDINGS


def _position_codes() -> torch.Tensor:
    g = torch.Generator().manual_seed(WORLD_SEED + 1)
    return 0.3 * torch.randn(CONTEXT_LEN, EMBED_DIM, generator=g)


def caption_tokens(cls: str | None, background: str | None) -> list[str]:
    """None, None gives the empty caption (classifier-free guidance's unconditional)."""
    words = ["<bos>"]
    if cls is not None:
        words += ["a", cls, "in", "the", background]
    words.append("<eos>")
    return words + ["<pad>"] * (CONTEXT_LEN - len(words))


def embed(tokens: list[str]) -> torch.Tensor:
    """[CONTEXT_LEN, 768] the caption's context, as a text encoder output would be.

    Contextual like CLIP's causal transformer: token i holds its word and a summary of the
    caption up to i, so <eos> and the padding carry the whole caption, as they do in SD1.5's
    prompts, instead of one token of eight naming the background. (Drawing the background from
    noise also needs base.training_noise.)"""
    table = word_embeddings()
    words = torch.stack([table[t] for t in tokens])
    summary = words.cumsum(0) / torch.arange(1, len(tokens) + 1).float().sqrt()[:, None]
    return (words + summary) / 2 ** 0.5 + _position_codes()


def background_templates() -> dict[str, torch.Tensor]:
    """The clean layout of every background, [4, 16, 16]."""
    global _TEMPLATES
    if _TEMPLATES is None:
        g = torch.Generator().manual_seed(WORLD_SEED + 2)
        y, x = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
        out = {}
        for name in BACKGROUNDS:
            c1, c2 = torch.randn(CHANNELS, generator=g) * 1.2, torch.randn(CHANNELS, generator=g) * 1.2
            if name == "beach":           # horizon: sky above, sand below
                w = (y >= 6).float()
            elif name == "forest":        # vertical trunks
                w = ((x // 3) % 2).float()
            elif name == "city":          # blocks
                w = (((x // 4) + (y // 4)) % 2).float()
            elif name == "snow":          # diagonal gradient
                w = (x + y) / (2 * SIZE - 2)
            elif name == "desert":        # dunes: horizontal bands
                w = ((y // 4) % 2).float() * 0.5 + y / (2 * SIZE)
            else:                         # night: dark, a fixed moon
                w = (((x - 12) ** 2 + (y - 3) ** 2) <= 4).float()
            out[name] = c1[:, None, None] * (1 - w) + c2[:, None, None] * w
        _TEMPLATES = out
    return _TEMPLATES


def random_identity(g: torch.Generator, cls: str | None = None) -> Identity:
    """Two clearly different colours (4-d) and a pattern; the class uniform unless given."""
    if cls is None:
        cls = CLASSES[int(torch.randint(len(CLASSES), (1,), generator=g))]
    a = torch.randn(CHANNELS, generator=g)
    b = torch.randn(CHANNELS, generator=g)
    a = COLOUR_NORM * a / a.norm().clamp_min(1e-6)
    b = COLOUR_NORM * b / b.norm().clamp_min(1e-6)
    pattern = PATTERNS[int(torch.randint(len(PATTERNS), (1,), generator=g))]
    return Identity(cls, tuple(a.tolist()), tuple(b.tolist()), pattern)


def identities(n: int, seed: int) -> list[Identity]:
    """n identities, classes in turn; disjoint seeds give disjoint identity sets."""
    g = torch.Generator().manual_seed(seed)
    return [random_identity(g, CLASSES[i % len(CLASSES)]) for i in range(n)]


def _shape_mask(cls: str, cx: float, cy: float, r: float, ss: int = 4) -> torch.Tensor:
    """Anti-aliased (4x supersampled) mask of a class's shape."""
    n = SIZE * ss
    c = (torch.arange(n).float() + 0.5) / ss - 0.5
    y, x = torch.meshgrid(c, c, indexing="ij")
    dx, dy = x - cx, y - cy
    if cls == "ball":
        m = (dx ** 2 + dy ** 2) <= r ** 2
    elif cls == "box":
        m = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    else:
        m = (dx.abs() + dy.abs()) <= r * 1.25
    return m.float().reshape(SIZE, ss, SIZE, ss).mean(dim=(1, 3))


def _texture(identity: Identity, cx: float, cy: float) -> torch.Tensor:
    """[4, 16, 16] the identity's colours laid out by its pattern, in object coordinates."""
    y, x = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    ox, oy = torch.round(x - cx), torch.round(y - cy)
    if identity.pattern == "split":
        w = (oy >= 0).float()
    elif identity.pattern == "hstripes":
        w = (oy.remainder(2) >= 1).float()
    elif identity.pattern == "vstripes":
        w = (ox.remainder(2) >= 1).float()
    else:
        w = ((ox + oy).remainder(2) >= 1).float()
    a = torch.tensor(identity.colour_a)[:, None, None]
    b = torch.tensor(identity.colour_b)[:, None, None]
    return a * (1 - w) + b * w


def render(identity: Identity, background: str | None, g: torch.Generator,
           place: tuple[float, float, float] | None = None) -> Scene:
    """One scene; background None renders the object alone on zeros (a reference photo with its
    background removed). place = (cx, cy, radius), random when None."""
    if place is None:
        r = 2.5 + 1.5 * float(torch.rand((), generator=g))
        cx = r + 1 + (SIZE - 2 * r - 3) * float(torch.rand((), generator=g))
        cy = r + 1 + (SIZE - 2 * r - 3) * float(torch.rand((), generator=g))
    else:
        cx, cy, r = place
    mask = _shape_mask(identity.cls, cx, cy, r)
    bg = background_templates()[background] if background else torch.zeros(CHANNELS, SIZE, SIZE)
    latent = bg * (1 - mask) + _texture(identity, cx, cy) * mask
    latent = latent + NOISE * torch.randn(latent.shape, generator=g)
    tokens = caption_tokens(identity.cls, background or BACKGROUNDS[0])
    return Scene(latent, mask, background or "", identity, tokens)


def random_scene(g: torch.Generator, identity: Identity | None = None) -> Scene:
    identity = identity or random_identity(g)
    background = BACKGROUNDS[int(torch.randint(len(BACKGROUNDS), (1,), generator=g))]
    return render(identity, background, g)


def object_mask_from_latent(latent: torch.Tensor, background: str, threshold: float = 0.6) -> torch.Tensor:
    """[16, 16] bool: where a generated latent departs from its caption's background layout
    (the object a model drew), for measuring identity in generated images."""
    diff = (latent - background_templates()[background]).norm(dim=0) / CHANNELS ** 0.5
    return diff > threshold
