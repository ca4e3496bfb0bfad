"""The default backend: a procedural synthesizer that needs no GPU and no weights.

It reads tempo ("140 BPM"), key ("Cm", "A minor", "F# major") and genre or mood words from the
prompt (``workers._synth_style``), writes a four-bar loop of drums, bass and chords for them
(``workers._synth_compose``), and arranges that loop over the requested duration: an intro
without drums, a breakdown without kick and bass every fourth loop, snare fills, a fade-out.

Everything random comes from one ``numpy`` generator seeded with the request's seed (derived
from the job id) and a CRC of its prompt, so a job renders bit-identical audio on every attempt
and two prompts sharing a seed still differ. Rendering is vectorised (numpy over whole notes and
stems, no Python per sample), so a CPU-only host renders far faster than real time and the default
backend never makes the queue wait; ``benchmarks/bench_synth.py`` measures it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

from dgxqueue.errors import ConfigError, JobCancelledError, PermanentGeneratorError, TransientGeneratorError
from dgxqueue.generators import GeneratedAudio, GenerationOutcome, GenerationRequest, JobControl

# numpy and the modules that compose and render are imported where audio is made: a producer's
# ``enqueue`` builds this backend only to read the models it serves, and numpy is most of its import.
if TYPE_CHECKING:
    from workers._synth_render import F32
    from workers._synth_style import Style

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
PEAK = 0.89  # about -1 dBFS: headroom for the int16 rounding and for players that resample


class SynthGenerator:
    """Serves the models in ``models`` (``synth`` by default) with procedural music."""

    name = "synth"

    def __init__(
        self,
        models: Sequence[str] = ("synth",),
        max_batch_size: int = 8,
        max_duration_seconds: float = 600.0,
        default_bpm: float | None = None,
    ) -> None:
        if isinstance(models, str):
            models = (models,)
        if not models or not all(isinstance(m, str) and m for m in models):
            raise ConfigError("generator.options.models", models, "a non-empty list of model names")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError("generator.options.max_batch_size", max_batch_size, "an integer >= 1")
        if not isinstance(max_duration_seconds, int | float) or not 0 < max_duration_seconds <= 3600:
            raise ConfigError("generator.options.max_duration_seconds", max_duration_seconds, "(0, 3600] s")
        bpm_ok = isinstance(default_bpm, int | float) and 40 <= default_bpm <= 240
        if default_bpm is not None and not bpm_ok:
            raise ConfigError("generator.options.default_bpm", default_bpm, "a tempo in 40..240 BPM")
        self.models = frozenset(models)
        self.max_batch_size = max_batch_size
        self.max_duration_seconds = float(max_duration_seconds)
        self.default_bpm = default_bpm

    def load(self) -> None:
        """Nothing to load, every sound is synthesized per request: only the modules that do it
        are imported now rather than during the first job."""
        import workers._synth_compose  # noqa: F401

    def batch_key(self, request: GenerationRequest) -> Hashable:
        return (request.sample_rate, request.channels)

    def validate(self, request: GenerationRequest) -> None:
        """Refuse channel counts other than 1 or 2, odd sample rates and overlong durations."""
        if request.channels not in (1, 2):
            raise PermanentGeneratorError(f"synth renders 1 or 2 channels, not {request.channels}")
        if not MIN_SAMPLE_RATE <= request.sample_rate <= MAX_SAMPLE_RATE:
            raise PermanentGeneratorError(
                f"synth renders at {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, not {request.sample_rate}"
            )
        duration = request.duration_seconds
        if not math.isfinite(duration) or not 0 < duration <= self.max_duration_seconds:
            raise PermanentGeneratorError(
                f"synth renders durations in (0, {self.max_duration_seconds:g}] seconds, not {duration}"
            )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutcome]:
        """Render each request on its own: one refused request leaves the others untouched."""
        outcomes: list[GenerationOutcome] = []
        for request in requests:
            try:
                if request.control.cancelled:  # asked while an earlier request rendered
                    raise JobCancelledError(f"synth: job {request.job_id} cancelled before it rendered")
                self.validate(request)
                outcomes.append(self.render(request))
            except (PermanentGeneratorError, JobCancelledError) as exc:
                outcomes.append(exc)
            except MemoryError as exc:
                outcomes.append(_out_of_memory(request, exc))
        return outcomes

    def render(self, request: GenerationRequest) -> GeneratedAudio:
        """Render one validated request, reporting the frames arranged so far as its progress
        (and stopping between loops once it is cancelled)."""
        import numpy as np

        from workers._synth_compose import write_loop
        from workers._synth_style import parse_style

        prompt = request.prompt.encode("utf-8", "surrogatepass")  # a row by plain SQL may hold anything
        rng = np.random.default_rng([request.seed % (1 << 64), zlib.crc32(prompt)])
        style = parse_style(request.prompt, rng, self.default_bpm)
        sr, channels = request.sample_rate, request.channels
        frames = round(request.duration_seconds * sr)
        stems, loop = write_loop(style, sr, channels, rng, frames)
        samples = arrange(stems, loop, frames, channels, request.control)
        master(samples, sr)
        return GeneratedAudio(samples=samples, sample_rate=sr, metadata=describe(style))


def _out_of_memory(request: GenerationRequest, exc: MemoryError) -> TransientGeneratorError:
    """The request's error, caused by a fresh ``MemoryError`` so that the daemon sees the machine's
    fault and gives the job back; fresh, because ``exc``'s traceback holds the failed render's arrays."""
    error = TransientGeneratorError(f"synth ran out of memory for job {request.job_id}")
    error.__cause__ = MemoryError(str(exc))
    return error


def arrange(stems: dict[str, F32], loop: int, frames: int, channels: int, control: JobControl | None = None) -> F32:
    """Overlap-add the loop's stems, loop after loop, switching stems on and off by section.
    ``control``: the frames done are reported after each loop, and a cancel stops between loops."""
    import numpy as np

    length = next(iter(stems.values())).shape[1]
    count = max(1, math.ceil(frames / loop))
    out = np.zeros((channels, max(frames, (count - 1) * loop + length)), np.float32)
    for k in range(count):
        if control is not None:
            if control.cancelled:
                raise JobCancelledError(f"synth: cancelled after {k * loop} of {frames} frames")
            control.report(min(frames, k * loop), frames)
        intro = k == 0 and count >= 4
        breakdown = count >= 5 and k % 4 == 3 and k != count - 1
        muted = {"kick", "snare", "bass"} if intro else {"kick", "bass"} if breakdown else set()
        if intro or breakdown or k % 2 == 0 or k == count - 1:
            muted.add("fill")
        for name, stem in stems.items():
            if name not in muted:
                out[:, k * loop : k * loop + stem.shape[1]] += stem
    if control is not None:
        control.report(frames, frames)
    return np.ascontiguousarray(out[:, :frames])


def master(samples: F32, sr: int) -> None:
    """Fade in 3 ms and out over the last 10% (at most 2 s), then normalise the peak, in place."""
    import numpy as np

    frames = samples.shape[1]
    fade_in = min(frames, int(0.003 * sr))
    if fade_in:
        samples[:, :fade_in] *= np.linspace(0.0, 1.0, fade_in, dtype=np.float32)
    fade_out = min(frames, int(min(2.0, 0.1 * frames / sr) * sr))
    if fade_out:
        samples[:, frames - fade_out :] *= np.linspace(1.0, 0.0, fade_out, dtype=np.float32) ** 2
    peak = float(np.max(np.abs(samples))) if frames else 0.0
    if peak > 0:
        samples *= np.float32(PEAK / peak)


def describe(style: Style) -> dict[str, Any]:
    """The specification's metadata fields for this style."""
    bpm = int(style.bpm) if style.bpm == int(style.bpm) else style.bpm
    return {
        "bpm": bpm,
        "key": style.key_name,
        "genre": style.genre.name,
        "instruments": list(style.genre.instruments),
        "tempo": style.tempo,
    }
