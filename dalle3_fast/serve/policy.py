"""What a request may ask for: API key, content blocklist, and the mapping of API fields to sampling settings."""
from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from dalle3_fast.serve.errors import APIError, invalid

QUALITIES = ("standard", "hd")
STYLES = ("vivid", "natural")
RESPONSE_FORMATS = ("url", "b64_json")
MAX_PROMPT = {"generations": 4000, "edits": 1000}
MAX_N = 10
MIN_EDIT_IMAGE_SIDE = 1024  # OpenAI's largest edit size: an image this large is always taken (then resized)
EDIT_IMAGE_SIDE_FACTOR = 4  # ... and up to 4x the largest served side; larger ones are refused undecoded
HD_STEP_FACTOR = 2          # quality "hd": twice the denoising steps
NATURAL_GUIDANCE = 0.7      # style "natural": guidance scaled down (less saturated, more literal)


class Blocklist:
    """Terms, one per line (blank lines and ``#`` comments skipped), matched case-insensitively as whole words."""

    def __init__(self, terms):
        self.terms = [t.strip() for t in terms if t.strip() and not t.strip().startswith("#")]
        self._pattern = (re.compile(r"(?<!\w)(" + "|".join(re.escape(t) for t in self.terms) + r")(?!\w)",
                                    re.IGNORECASE) if self.terms else None)

    @classmethod
    def from_file(cls, path) -> "Blocklist":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--blocklist {path}: no such file (one term per line)")
        return cls(path.read_text(encoding="utf-8").splitlines())

    def match(self, text: str) -> str | None:
        if self._pattern is None:
            return None
        m = self._pattern.search(text)
        return m.group(1) if m else None

    def check(self, prompt: str) -> None:
        if self.match(prompt) is not None:
            raise APIError(400, "Your request was rejected as a result of our safety system. Your prompt may "
                                "contain text that is not allowed by our safety system.", param="prompt",
                           code="content_policy_violation")


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """``Authorization: Bearer <key>`` must equal ``expected`` when one is configured."""
    if expected is None:
        return
    scheme, _, key = (authorization or "").partition(" ")
    if not authorization:
        raise APIError(401, "You didn't provide an API key. Provide it in the Authorization header "
                            "(Authorization: Bearer YOUR_KEY).", code="missing_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), expected.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


@dataclass(frozen=True)
class Settings:
    """Sampling settings that requests must share to be batched together."""

    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    decoder: str
    upsample: bool

    @property
    def batch_key(self) -> tuple:
        return (self.width, self.height, self.steps, self.guidance, self.sampler, self.decoder)


class RequestPolicy:
    """Validates fields and maps them onto a pipeline's settings.

    ``sizes``: the sizes served (default: the pipeline's own, those it was made for); the pipeline's default
    size when a request names none, or the first served size if the operator left that one out.
    Raises ValueError for a size the pipeline cannot generate.
    """

    def __init__(self, pipe, *, model_names, blocklist: Blocklist | None = None, steps: int | None = None,
                 max_pixels: int | None = None, sizes=None):
        self.pipe = pipe
        self.model_names = list(model_names)
        self.blocklist = blocklist or Blocklist([])
        self.steps = steps or int(pipe.defaults["steps"])
        self.max_pixels = max_pixels
        self._dims: dict[str, tuple[int, int]] = {}
        for size in sizes or pipe.sizes:
            w, h = pipe.check_size(size)
            self._dims[f"{w}x{h}"] = (w, h)
        if not self._dims:
            raise ValueError("no sizes to serve; name at least one, e.g. 64x64")
        self.sizes = list(self._dims)
        native = pipe.defaults["size"]
        self.default_size = native if native in self.sizes else self.sizes[0]
        self.max_image_side = max(MIN_EDIT_IMAGE_SIDE,
                                  EDIT_IMAGE_SIDE_FACTOR * max(max(wh) for wh in self._dims.values()))

    def model(self, model: str | None) -> str:
        if model is None:
            return self.model_names[0]
        if not isinstance(model, str) or model not in self.model_names:
            raise APIError(404, f"The model '{model}' does not exist. Available: {', '.join(self.model_names)}.",
                           param="model", code="model_not_found")
        return model

    def prompt(self, prompt, endpoint: str) -> str:
        limit = MAX_PROMPT[endpoint]
        if not isinstance(prompt, str) or not prompt.strip():
            raise invalid("prompt", "'prompt' must be a non-empty string.")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # an unpaired surrogate: no tokenizer can take it
            raise invalid("prompt", f"'prompt' is not valid Unicode text: character {exc.start} is an unpaired "
                                    "surrogate (send UTF-8, with surrogate pairs only as pairs).") from None
        if len(prompt) > limit:
            raise invalid("prompt", f"'prompt' is {len(prompt)} characters long; the maximum is {limit}.",
                          code="string_above_max_length")
        self.blocklist.check(prompt)
        return prompt

    @staticmethod
    def n(n) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
            raise invalid("n", f"'n' must be an integer between 1 and {MAX_N}; got {n!r}.")
        return n

    def size(self, size) -> tuple[int, int]:
        if size is None:
            size = self.default_size
        if not isinstance(size, str) or size not in self.sizes:
            raise invalid("size", f"'size' {size!r} is not served here; use one of {', '.join(self.sizes)}.")
        w, h = self._dims[size]
        if self.max_pixels is not None and w * h > self.max_pixels:
            raise invalid("size", f"'size' {size} is larger than this server allows ({self.max_pixels} pixels); "
                                  f"use one of {', '.join(self._fitting())}.")
        return w, h

    def _fitting(self) -> list[str]:
        return [s for s, (w, h) in self._dims.items() if self.max_pixels is None or w * h <= self.max_pixels]

    @staticmethod
    def choice(name: str, value, options, default: str) -> str:
        if value is None:
            return default
        if value not in options:
            raise invalid(name, f"'{name}' must be one of {', '.join(options)}; got {value!r}.")
        return value

    def settings(self, *, size, quality, style) -> Settings:
        width, height = self.size(size)
        quality = self.choice("quality", quality, QUALITIES, "standard")
        style = self.choice("style", style, STYLES, "vivid")
        guidance = float(self.pipe.defaults["guidance"])
        if style == "natural":
            guidance = max(1.0, round(guidance * NATURAL_GUIDANCE, 4))
        steps = self.steps * (HD_STEP_FACTOR if quality == "hd" else 1)
        return Settings(width, height, steps, guidance, self.pipe.defaults["sampler"], self.pipe.defaults["decoder"],
                        upsample=style == "vivid" and self.pipe.upsampler is not None)
