"""The synthesizer's instruments: drum one-shots, a vectorised note renderer, and drum grids.

Speed comes from never looping over samples in Python: drum hits are short arrays added at their
onsets (a loop over events, a few hundred per loop), and a melodic line is rendered in one pass
over all its frames with per-frame note indices (``np.repeat``) driving phase and envelope.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
TAU = np.float32(2 * np.pi)

# 16 steps a bar; a digit is a velocity in tenths, "." is a rest. "open" is an open hat or ride.
DRUM_PATTERNS: dict[str, dict[str, str]] = {
    "house": {"kick": "9...9...9...9...", "snare": "....8.......8...", "hat": "3.3.3.3.3.3.3.3.",
              "open": "..7...7...7...7."},
    "techno": {"kick": "9...9...9...9...", "snare": "....6.......6...", "hat": "5353535353535353",
               "open": "..6...6...6...6."},
    "trap": {"kick": "9......8..9.....", "snare": "........9.......", "hat": "6464646464646464", "open": ""},
    "boombap": {"kick": "9......6..9.....", "snare": "....9.......9...", "hat": "5.4.5.4.5.4.5.4.",
                "open": ""},
    "dnb": {"kick": "9.........9.....", "snare": "....9.......9...", "hat": "4.4.4.4.4.4.4.4.", "open": ""},
    "rock": {"kick": "9.....9.9.......", "snare": "....9.......9...", "hat": "6.5.6.5.6.5.6.5.", "open": ""},
    "pop": {"kick": "9.......9.6.....", "snare": "....9.......9...", "hat": "5.5.5.5.5.5.5.5.", "open": ""},
    "jazz": {"kick": "3.......3.......", "snare": "......2.....3..2", "hat": "....5.......5...",
             "open": "4..24...4..24..."},
}


def pattern_steps(pattern: str) -> list[tuple[int, float]]:
    """(step, velocity) for each hit of a 16-step pattern string."""
    return [(i, (int(c) + 1) / 10) for i, c in enumerate(pattern) if c != "."]


def _t(seconds: float, sr: int) -> F32:
    return np.arange(max(1, int(seconds * sr)), dtype=np.float32) / np.float32(sr)


def kick(sr: int, rng: np.random.Generator, *, long: bool, drive: float) -> F32:
    """A sine whose pitch falls fast (the punch) onto a low body, plus a short noise click."""
    t = _t(1.2 if long else 0.45, sr)
    freq = 48.0 + 120.0 * np.exp(-t / 0.03)
    body = np.sin(TAU * np.cumsum(freq / sr, dtype=np.float32)) * np.exp(-t / (0.45 if long else 0.16))
    click = rng.standard_normal(t.size, dtype=np.float32) * np.exp(-t / 0.002) * 0.3
    gain = 1.0 + 2.5 * drive
    return np.asarray(np.tanh((body + click) * gain) / np.tanh(gain), dtype=np.float32)


def snare(sr: int, rng: np.random.Generator, *, clap: bool) -> F32:
    """Snare: a 190 Hz tone under bright noise. Clap: three noise bursts and a short tail."""
    t = _t(0.35, sr)
    noise = np.diff(rng.standard_normal(t.size + 1, dtype=np.float32))  # differencing brightens it
    if clap:
        bursts = sum(np.where(t >= d, np.exp(-(t - d) / 0.006), 0.0) for d in (0.0, 0.011, 0.022))
        return np.asarray(noise * (0.6 * bursts + 0.5 * np.exp(-t / 0.09)) * 0.6, dtype=np.float32)
    tone = np.sin(TAU * 190.0 * t) * np.exp(-t / 0.05)
    return np.asarray(0.5 * tone + 0.5 * noise * np.exp(-t / 0.11), dtype=np.float32)


def metal(sr: int, rng: np.random.Generator, *, decay: float, noise: float = 1.0) -> F32:
    """Hi-hat or ride: six inharmonic square waves (the 808 recipe) and noise, high-passed."""
    t = _t(min(1.5, decay * 6), sr)
    nyquist = 0.45 * sr
    freqs = (205.3, 304.4, 369.6, 522.7, 540.0, 800.0)
    tones = sum(np.sign(np.sin(TAU * min(f, nyquist) * t)) for f in freqs)
    raw = np.concatenate([[0.0], tones / 6 + noise * rng.standard_normal(t.size, dtype=np.float32)])
    bright = np.diff(np.diff(raw, prepend=0.0))[: t.size]  # second difference: a cheap high-pass
    return np.asarray(bright * np.exp(-t / decay) * 0.35, dtype=np.float32)


def place(buf: F32, sound: F32, events: list[tuple[int, float]]) -> None:
    """Add ``sound`` at each (frame, gain) onset, cut at the end of ``buf``."""
    for start, gain in events:
        end = min(buf.size, start + sound.size)
        if 0 <= start < end:
            buf[start:end] += np.float32(gain) * sound[: end - start]


@dataclass(frozen=True)
class Timbre:
    """How a melodic line sounds. Times are in seconds; ``decay`` 0 means the note sustains."""

    partials: tuple[tuple[int, float], ...] = ((1, 1.0),)  # (whole-number frequency ratio, level)
    attack: float = 0.005
    decay: float = 0.0
    release: float = 0.06
    bright_decay: float = 0.0  # partials after the first fade with this time constant
    saw_cutoff: float = 0.0  # > 0: a sawtooth smoothed to roughly this many Hz, instead of partials
    detune: float = 0.0  # a second sawtooth this many cents sharp (reese bass, pads)
    drive: float = 0.0  # tanh saturation, 0..1
    glide: float = 0.0  # pitch slides between notes over this time (808)


def _moving_average(x: npt.NDArray[np.float64], width: int) -> npt.NDArray[np.float64]:
    """A box low-pass in O(n) via a running sum; width 1 returns ``x``."""
    if width <= 1:
        return x
    c = np.cumsum(np.concatenate([np.zeros(width), x]))
    return np.asarray((c[width:] - c[:-width]) / width)


def render_line(notes: npt.NDArray[np.float64], frames: int, sr: int, timbre: Timbre) -> F32:
    """Render a line of notes (or of chords, all voices sharing one envelope) into ``frames``.

    ``notes`` rows: (start frame, length in frames, velocity, midi pitch of each voice...). A note
    ends where the next one starts: lines are monophonic, chords move together.
    """
    out = np.zeros(frames, np.float32)
    notes = notes[(notes[:, 0] >= 0) & (notes[:, 0] < frames)] if notes.size else notes
    if notes.size == 0:
        return out
    notes = notes[np.argsort(notes[:, 0], kind="stable")]
    starts = notes[:, 0].astype(np.int64)
    gaps = np.diff(np.append(starts, frames))
    min_release = max(1, int(0.004 * sr))
    # End each note early enough that its release finishes before the next onset: no clicks.
    length = np.maximum(1, np.minimum(notes[:, 1], gaps - min_release))
    release = np.clip(gaps - length, 1, max(1, int(timbre.release * sr)))
    first = int(starts[0])
    idx = np.repeat(np.arange(starts.size), gaps)
    t = (np.arange(frames - first) - np.repeat(starts - first, gaps)).astype(np.float32)

    # Per-note values gathered per frame in float32: gathers and float32 ufuncs are the cheap ones.
    env = notes[:, 2].astype(np.float32)[idx]
    env *= np.minimum(np.float32(1), t * np.float32(1 / max(1.0, timbre.attack * sr)))
    if timbre.decay:
        env *= np.exp(t * np.float32(-1 / (timbre.decay * sr)))
    end, inv_release = (length + release).astype(np.float32), (1 / release).astype(np.float32)
    env *= np.clip((end[idx] - t) * inv_release[idx], 0, 1)
    fade = np.exp(t * np.float32(-1 / (timbre.bright_decay * sr))) if timbre.bright_decay else None

    wave = np.zeros(t.size, np.float32)
    saws = np.zeros(t.size if timbre.saw_cutoff else 0)
    for voice in range(3, notes.shape[1]):
        freq = (440.0 * 2.0 ** ((notes[:, voice] - 69.0) / 12.0))[idx]
        phase = np.cumsum(_moving_average(freq, int(timbre.glide * sr)) / sr)
        if timbre.saw_cutoff:
            saws += 2.0 * (phase - np.floor(phase)) - 1.0
            if timbre.detune:
                sharp = phase * 2 ** (timbre.detune / 1200)
                saws += 2.0 * (sharp - np.floor(sharp)) - 1.0
            continue
        cycle = (TAU * (phase - np.floor(phase))).astype(np.float32)  # wrapped: exact in float32
        for n, (ratio, level) in enumerate(timbre.partials):
            partial = np.sin(cycle * np.float32(ratio)) * np.float32(level)  # ratios are whole numbers
            wave += partial * fade if n and fade is not None else partial
    if timbre.saw_cutoff:  # the filter is linear: smooth the sum of the voices once
        wave = (_moving_average(saws, int(sr / timbre.saw_cutoff)) * (0.5 if timbre.detune else 1.0)).astype(
            np.float32
        )
    if timbre.drive:
        gain = np.float32(1 + 4 * timbre.drive)
        wave = np.tanh(wave * gain) / np.tanh(gain)
    out[first:] = wave * env
    return out


def spread(mono: F32, channels: int, *, pan: float = 0.0, width: float = 0.0, sr: int = 0) -> F32:
    """Mono to (channels, frames): constant-power ``pan`` (-1 left .. 1 right), and ``width``
    adding a 12 ms delayed copy to one side and subtracting it from the other, which widens the
    image while the two channels still sum back to the dry signal."""
    if channels == 1:
        return mono[None, :]
    angle = (pan + 1) * np.pi / 4
    left, right = mono * np.float32(np.cos(angle) * np.sqrt(2)), mono * np.float32(np.sin(angle) * np.sqrt(2))
    if width and sr:
        delay = int(0.012 * sr)
        side = np.concatenate([np.zeros(delay, np.float32), mono[: mono.size - delay]]) * np.float32(width)
        left, right = left + side, right - side
    return np.stack([left, right])
