"""Training-free synthesis, second strategy: a place's best soundscape captions handed to a text-to-audio model.

The model is a plug-in: any object with a `sample_rate` (Hz) and a `generate(prompt, seconds)` method returning
mono float samples in [-1, 1] (about `seconds` long; `listen` loops or trims them and sets their loudness). Name
a zero-argument factory that returns one as `module:attribute` with `python -m pipeline listen ... --generator
module:attribute`; the module must be importable (installed, or on PYTHONPATH). This project ships no such
model: install one and its weights yourself, and wrap it, e.g. for a diffusers pipeline

    # my_tta.py
    class AudioLDM:
        sample_rate = 16_000
        def __init__(self):
            from diffusers import AudioLDMPipeline
            self.pipe = AudioLDMPipeline.from_pretrained("cvssp/audioldm-s-full-v2")
        def generate(self, prompt, seconds):
            return self.pipe(prompt, audio_length_in_s=seconds).audios[0]

    python -m pipeline listen BUILD --at LAT,LON --generator my_tta:AudioLDM
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from common.errors import first_line
from model.audio import resample
from pipeline.errors import ListenError

PROMPT_SEPARATOR = "; "


@runtime_checkable
class TextToAudio(Protocol):
    sample_rate: int

    def generate(self, prompt: str, seconds: float) -> np.ndarray: ...


def load_generator(spec: str) -> TextToAudio:
    """The generator a `module:attribute` factory makes, refused in one line if it cannot be had."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ListenError(f"--generator {spec!r} is not module:attribute; name a factory, e.g. my_tta:AudioLDM")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ListenError(
            f"--generator {spec}: cannot import it ({first_line(exc)}); install the module or put it on PYTHONPATH"
        ) from None
    check_factory(spec, factory)
    generator = factory()
    if not isinstance(generator, TextToAudio):
        raise ListenError(
            f"--generator {spec} made a {type(generator).__name__}, which lacks sample_rate or generate(prompt,"
            " seconds); wrap the model as pipeline/synthesis.py shows"
        )
    return generator


def check_factory(spec: str, factory: object) -> None:
    """Refuse a `--generator` attribute that cannot be called without arguments."""
    fix = "name a class or function that takes no arguments and returns the generator"
    if not callable(factory):
        raise ListenError(f"--generator {spec} is a {type(factory).__name__}, not a factory; {fix}")
    try:
        inspect.signature(factory).bind()
    except TypeError:
        raise ListenError(f"--generator {spec} cannot be called without arguments; {fix}") from None
    except ValueError:  # no signature to read (some built-ins): calling it will tell
        pass


def prompt_of(captions: Sequence[str]) -> str:
    """One prompt from a place's captions, best first, each once."""
    return PROMPT_SEPARATOR.join(dict.fromkeys(caption.strip() for caption in captions if caption.strip()))


def generated(generator: TextToAudio, prompt: str, seconds: float) -> np.ndarray:
    """The generator's audio for `prompt`, mono float32 at the model's sample rate, refused if it is empty or not
    finite."""
    samples = np.asarray(generator.generate(prompt, seconds), dtype=np.float32)
    if samples.ndim > 1:
        samples = samples.mean(axis=tuple(range(samples.ndim - 1)))
    if samples.size == 0 or not np.isfinite(samples).all():
        raise ListenError(f"the generator gave {samples.size} samples, not all finite, for {prompt!r}; check the model")
    return resample(samples, int(generator.sample_rate))
