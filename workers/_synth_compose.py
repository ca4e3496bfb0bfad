"""Writing one loop (four bars) for a :class:`Style`: a chord progression, a bass line on its
roots, and drums from the genre's grid, each rendered as a separate stem so the arrangement can
bring them in and out. Stems are (channels, loop + tail) so note tails overlap the next loop.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from workers._synth_render import (
    DRUM_PATTERNS,
    F32,
    Timbre,
    kick,
    metal,
    pattern_steps,
    place,
    render_line,
    snare,
    spread,
)
from workers._synth_style import Style

BARS, STEPS = 4, 16
TAIL_SECONDS = 1.5
Row = tuple[float, ...]  # (step, length in steps, velocity, midi pitch of each voice...)
_QUALITIES = {"M": (0, 4, 7), "m": (0, 3, 7), "M7": (0, 4, 7, 11), "m7": (0, 3, 7, 10), "7": (0, 4, 7, 10),
              "5": (0, 7, 12)}
# (semitones above the key's root, quality) for each bar.
_MINOR = (((0, "m"), (8, "M"), (3, "M"), (10, "M")), ((0, "m"), (5, "m"), (10, "M"), (3, "M")),
          ((0, "m"), (8, "M"), (5, "m"), (7, "m")), ((0, "m"), (3, "M"), (10, "M"), (5, "m")))
_MAJOR = (((0, "M"), (7, "M"), (9, "m"), (5, "M")), ((0, "M"), (9, "m"), (5, "M"), (7, "M")),
          ((0, "M"), (5, "M"), (9, "m"), (7, "M")), ((0, "M"), (5, "M"), (0, "M"), (7, "M")))
_JAZZ = (((2, "m7"), (7, "7"), (0, "M7"), (9, "m7")), ((0, "m7"), (5, "m7"), (10, "7"), (3, "M7")))
_SEVENTHS = {"M": "M7", "m": "m7"}

_BASS_TIMBRES = {
    "sub": Timbre(((1, 1.0), (2, 0.25)), attack=0.01, release=0.08),
    "808": Timbre(((1, 1.0), (2, 0.15)), attack=0.003, decay=0.9, release=0.1, drive=0.35, glide=0.03),
    "offbeat": Timbre(saw_cutoff=600, attack=0.003, decay=0.18, release=0.03),
    "eighths": Timbre(saw_cutoff=800, attack=0.003, decay=0.3, release=0.03, drive=0.3),
    "rolling": Timbre(saw_cutoff=450, attack=0.002, decay=0.08, release=0.02),
    "walking": Timbre(((1, 1.0), (2, 0.4), (3, 0.15)), attack=0.004, decay=0.5, release=0.05,
                      bright_decay=0.08),
    "reese": Timbre(saw_cutoff=350, detune=14, attack=0.02, release=0.15),
    "drone": Timbre(((1, 1.0), (2, 0.2)), attack=0.3, release=0.3),
}
_CHORD_TIMBRES = {
    "keys": Timbre(((1, 1.0), (2, 0.35), (3, 0.1)), attack=0.004, decay=1.4, release=0.25, bright_decay=0.15),
    "piano": Timbre(((1, 1.0), (2, 0.5), (3, 0.25)), attack=0.002, decay=0.9, release=0.2, bright_decay=0.08),
    "stabs": Timbre(saw_cutoff=2200, attack=0.002, decay=0.12, release=0.05),
    "pad": Timbre(saw_cutoff=1400, detune=9, attack=0.6, release=0.9),
    "bells": Timbre(((1, 1.0), (2, 0.6), (3, 0.3)), attack=0.001, decay=0.5, release=0.1, bright_decay=0.05),
    "power": Timbre(saw_cutoff=3000, attack=0.003, release=0.04, drive=0.8),
}
# 16-step rhythms for the chords: (step, length in steps).
_CHORD_RHYTHMS = {
    "keys": ((0, 9), (10, 6)), "piano": ((0, 14),), "pad": ((0, 15),),
    "power": tuple((s, 2) for s in range(0, 16, 2)), "stabs": ((0, 1), (3, 1), (6, 1), (10, 1), (13, 1)),
}


def progression(style: Style, rng: np.random.Generator) -> list[tuple[int, tuple[int, ...]]]:
    """(root pitch class, chord intervals) for each bar."""
    if style.genre.name == "jazz":
        bars = _JAZZ[1 if style.minor else 0]
    else:
        choices = _MINOR if style.minor else _MAJOR
        bars = choices[int(rng.integers(len(choices)))]
    chords = []
    for offset, quality in bars:
        if style.genre.chords in ("keys", "piano") and quality in _SEVENTHS:
            quality = _SEVENTHS[quality]
        if style.genre.chords == "power":
            quality = "5"
        chords.append(((style.root + offset) % 12, _QUALITIES[quality]))
    return chords


class LoopWriter:
    """Places notes and hits on the loop's 64-step grid, with swing and a little humanity."""

    def __init__(self, style: Style, sr: int, rng: np.random.Generator, needed: int) -> None:
        self.style, self.sr, self.rng = style, sr, rng
        self.loop = round(BARS * 4 * 60.0 / style.bpm * sr)
        # A song shorter than the loop renders only what it uses (plus tail), not the whole loop.
        self.frames = min(self.loop, needed) + int(TAIL_SECONDS * sr)
        self.step = self.loop / (BARS * STEPS)
        human = style.genre.name in ("lo-fi", "hip hop", "jazz", "rock")
        self.jitter = 0.004 * sr if human else 0.0

    def frame(self, step: float) -> int:
        swing = self.style.genre.swing * self.step if int(step) % 2 == 1 and step == int(step) else 0.0
        jitter = self.rng.normal(0.0, self.jitter) if self.jitter else 0.0
        return max(0, round(step * self.step + swing + jitter))

    def hits(self, pattern: str, *, ghost: float = 0.0) -> list[tuple[int, float]]:
        """Every bar of a drum grid, velocities varied a little, with optional ghost notes."""
        events = []
        for bar in range(BARS):
            for step, velocity in pattern_steps(pattern):
                events.append((self.frame(bar * STEPS + step), velocity * self.rng.uniform(0.85, 1.0)))
            for step in range(1, STEPS, 2):
                if ghost and self.rng.random() < ghost:
                    events.append((self.frame(bar * STEPS + step), 0.2))
        return events

    def notes(self, rows: list[Row]) -> npt.NDArray[np.float64]:
        """Rows of (step, length in steps, velocity, midi...) as frames for :func:`render_line`."""
        if not rows:
            return np.zeros((0, 4))
        return np.array([(self.frame(r[0]), max(1.0, r[1] * self.step), *r[2:]) for r in rows])


def _bass_rows(style: Style, chords: list[tuple[int, tuple[int, ...]]]) -> list[Row]:
    kind = style.genre.bass
    rows: list[Row] = []
    for bar, (pc, intervals) in enumerate(chords):
        low = 28 + (pc - 4) % 12 if kind in ("sub", "808", "reese", "drone") else 40 + (pc - 4) % 12
        nxt = 40 + (chords[(bar + 1) % len(chords)][0] - 4) % 12
        b = bar * STEPS
        if kind == "sub":
            rows += [(b, 8, 0.9, low), (b + 10, 5, 0.75, low)]
        elif kind == "808":  # on the kicks, each held to the next, the third an octave up
            hits = [s for s, _ in pattern_steps(DRUM_PATTERNS["trap"]["kick"])] + [STEPS]
            rows += [(b + s, hits[i + 1] - s, 0.9, low + 12 * (i == 2)) for i, s in enumerate(hits[:-1])]
        elif kind == "offbeat":
            rows += [(b + s, 1.5, 0.85, low) for s in (2, 6, 10, 14)]
        elif kind == "eighths":
            rows += [(b + s, 1.8, 0.8, low + 12 * (s == 6)) for s in range(0, STEPS, 2)]
        elif kind == "rolling":  # 16ths between the kicks
            rows += [(b + s, 0.9, 0.8, low + 12 * (s % 8 == 3)) for s in range(STEPS) if s % 4]
        elif kind == "walking":  # root, third, fifth, then a half step below the next root
            line = (low, low + intervals[1], low + intervals[2], nxt - 1)
            rows += [(b + 4 * i, 3.6, 0.8, p) for i, p in enumerate(line)]
        else:  # reese, drone: one long note a bar
            rows.append((b, 15.5, 0.8, low))
    return rows


def _chord_rows(style: Style, chords: list[tuple[int, tuple[int, ...]]]) -> list[Row]:
    """Chords as rows of four voices, or for bells an arpeggio two octaves up."""
    kind = style.genre.chords
    rows: list[Row] = []
    for bar, (pc, intervals) in enumerate(chords):
        root = 48 + (pc - 5) % 12
        tones = [root + i + 12 * (root + i < 55) for i in intervals]
        tones += [tones[0] + 12] * (4 - len(tones))
        b = bar * STEPS
        if kind == "bells":
            arpeggio = enumerate(range(0, STEPS, 2))
            rows += [(b + s, 2, 0.5, tones[n % len(intervals)] + 12) for n, s in arpeggio]
            continue
        rows += [(b + s, length, 0.55 if s else 0.65, *tones) for s, length in _CHORD_RHYTHMS[kind]]
    return rows


def write_loop(
    style: Style, sr: int, channels: int, rng: np.random.Generator, needed: int
) -> tuple[dict[str, F32], int]:
    """The loop's stems (channels, loop + tail, or less when ``needed`` frames are fewer) by name,
    and the loop's length in frames."""
    w = LoopWriter(style, sr, rng, needed)
    genre, drive = style.genre, style.drive
    chords = progression(style, rng)
    stems: dict[str, F32] = {}

    bass = render_line(w.notes(_bass_rows(style, chords)), w.frames, sr, _BASS_TIMBRES[genre.bass])
    stems["bass"] = spread(bass * np.float32(0.55), channels)
    rows, timbre = _chord_rows(style, chords), _CHORD_TIMBRES[genre.chords]
    # Slow pads alternate between two lines so each chord's release overlaps the next's attack.
    lines = [rows[0::2], rows[1::2]] if genre.chords == "pad" else [rows]
    pad = np.zeros(w.frames, np.float32)
    for line in lines:
        pad += render_line(w.notes(line), w.frames, sr, timbre)
    stems["chords"] = spread(pad * np.float32(0.16), channels, width=0.45, sr=sr)

    if genre.drums:
        grid, level = DRUM_PATTERNS[genre.drums], np.float32(0.7 + 0.5 * drive)
        jazz = genre.drums == "jazz"
        for name, sound, pan, ghost in (
            ("kick", kick(sr, rng, long=genre.drums == "trap", drive=drive), 0.0, 0.0),
            ("snare", snare(sr, rng, clap=genre.drums in ("house", "techno", "trap", "pop")), 0.05,
             0.12 if genre.drums in ("boombap", "jazz", "rock") else 0.0),
            ("hat", metal(sr, rng, decay=0.03), 0.35, 0.0),
            ("open", metal(sr, rng, decay=0.5 if jazz else 0.12, noise=0.2 if jazz else 1.0), -0.3, 0.0),
        ):
            if grid[name]:
                events = w.hits(grid[name], ghost=ghost)
                if genre.drums == "trap" and name == "hat":  # hi-hat rolls: a 16th cut into thirds
                    events += [(w.frame(s) + round(k * w.step / 3), 0.35) for s in range(3, BARS * STEPS, 8)
                               if rng.random() < 0.4 for k in (1, 2)]
                buf = np.zeros(w.frames, np.float32)
                place(buf, sound, events)
                stems[name] = spread(buf * level, channels, pan=pan)
        fill = np.zeros(w.frames, np.float32)  # a snare run into the next loop, used every other loop
        run = [(w.frame(3 * STEPS + s), 0.2 + 0.1 * (s - 12)) for s in (13, 14, 15)]
        place(fill, snare(sr, rng, clap=False), run)
        stems["fill"] = spread(fill * level, channels, pan=0.1)
    if genre.name == "lo-fi":  # vinyl crackle: sparse clicks, different in each channel
        crackle = np.zeros((channels, w.frames), np.float32)
        count = int(w.frames * 0.0007)
        where = rng.integers(channels, size=count), rng.integers(w.frames, size=count)
        crackle[where] = rng.uniform(-0.15, 0.15, count)
        stems["texture"] = crackle
    return stems, w.loop
