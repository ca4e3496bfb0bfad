"""Reading a prompt into a :class:`Style`: tempo, key, genre and mood, with per-genre defaults.

Only words the prompt states are taken from it; anything it leaves open (the key's root, the
chord progression) is drawn from the job's random generator, so one job always sounds the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MIN_BPM, MAX_BPM = 40.0, 240.0
_NOTE_INDEX = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_FLAT_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
_SHARP_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


@dataclass(frozen=True)
class Genre:
    """How a genre sounds: its tempo, mode, drum grid, bass and chord styles, and their names."""

    name: str
    aliases: tuple[str, ...]
    bpm: float
    minor: bool
    drums: str  # key of workers._synth_render.DRUM_PATTERNS; "" for no drums
    bass: str  # key of workers._synth_compose._BASS_TIMBRES
    chords: str  # key of workers._synth_compose._CHORD_TIMBRES
    swing: float  # fraction of a 16th that the off-16ths are delayed
    instruments: tuple[str, ...]


GENRES: tuple[Genre, ...] = (
    # Checked in this order, so the more specific names win ("lo-fi hip hop" is lo-fi).
    Genre("lo-fi", ("lo-fi", "lofi", "lo fi", "chillhop"), 85, True, "boombap", "sub", "keys", 0.28,
          ("drums", "bass", "electric piano", "vinyl crackle")),
    Genre("drum and bass", ("drum and bass", "drum & bass", "drum n bass", "dnb", "d&b", "jungle",
                            "liquid"), 174, True, "dnb", "reese", "pad", 0.0,
          ("breakbeat drums", "reese bass", "pad")),
    Genre("trap", ("trap", "drill"), 140, True, "trap", "808", "bells", 0.0,
          ("808 kick", "clap", "hi-hats", "808 bass", "bells")),
    Genre("techno", ("techno", "industrial"), 130, True, "techno", "rolling", "stabs", 0.0,
          ("kick", "clap", "hi-hats", "bass", "synth stabs")),
    Genre("house", ("house", "disco", "garage", "edm", "dance"), 124, False, "house", "offbeat", "stabs", 0.0,
          ("kick", "clap", "open hi-hat", "bass", "chord stabs")),
    Genre("synthwave", ("synthwave", "retrowave", "80s", "outrun"), 105, True, "rock", "eighths", "pad", 0.0,
          ("drums", "synth bass", "synth pad")),
    Genre("hip hop", ("hip hop", "hip-hop", "hiphop", "boom bap", "rap"), 92, True, "boombap", "sub", "piano",
          0.18, ("drums", "bass", "piano")),
    Genre("jazz", ("jazz", "swing", "bebop", "bossa"), 120, False, "jazz", "walking", "piano", 0.33,
          ("ride cymbal", "brushed snare", "upright bass", "piano")),
    Genre("rock", ("rock", "punk", "metal", "grunge", "guitar"), 120, False, "rock", "eighths", "power", 0.0,
          ("drums", "bass guitar", "distorted guitar")),
    Genre("ambient", ("ambient", "drone", "soundscape", "meditation", "cinematic"), 70, False, "", "drone",
          "pad", 0.0, ("pad", "sub bass")),
    Genre("pop", ("pop", "electronic", "synth", "beat"), 110, False, "pop", "eighths", "keys", 0.0,
          ("drums", "bass", "keys")),
)
DEFAULT_GENRE = GENRES[-1]

# mood word -> (bpm factor, mode: True minor / False major / None unchanged, drive 0..1)
_MOODS: dict[str, tuple[float, bool | None, float]] = {
    "dark": (1.0, True, 0.6), "sad": (0.9, True, 0.3), "melancholic": (0.9, True, 0.3),
    "moody": (1.0, True, 0.4), "happy": (1.05, False, 0.5), "uplifting": (1.05, False, 0.6),
    "bright": (1.0, False, 0.5), "chill": (0.9, None, 0.25), "relaxed": (0.9, None, 0.2),
    "calm": (0.85, None, 0.15), "mellow": (0.9, None, 0.2), "energetic": (1.1, None, 0.9),
    "aggressive": (1.1, True, 1.0), "intense": (1.08, None, 0.9), "hard": (1.05, None, 0.9),
    "slow": (0.8, None, 0.3), "fast": (1.2, None, 0.7), "uptempo": (1.15, None, 0.7),
}
_BPM = re.compile(
    r"(?<![\d.])(\d{2,3}(?:\.\d+)?)\s*-?\s*bpm\b|\b(?:bpm|tempo)\s*[:=]?\s*(\d{2,3}(?:\.\d+)?)(?!\d)",
    re.IGNORECASE,
)
# "Cm", "F# major", "Bb", "in C", "key of D"; a lower-case letter only with a full mode word, and a
# bare capital only after "in"/"key", so "A dark beat" names no key.
_KEY = re.compile(
    r"(?P<ctx>\b(?:in|key of|key)\s+)?(?<![\w#])(?P<letter>[A-Ga-g])(?P<acc>[#b\u266f\u266d]?)"
    r"(?:\s*(?P<mode>(?i:major|maj|minor|min)|m)(?![A-Za-z]))?(?![\w#\u266f\u266d])"
)


@dataclass(frozen=True)
class Style:
    """Everything the renderer needs to know about one request's music."""

    genre: Genre
    bpm: float
    root: int  # pitch class of the key, C = 0
    minor: bool
    key_name: str
    drive: float  # 0 (gentle) .. 1 (hard): drum level, saturation, brightness

    @property
    def tempo(self) -> str:
        """The specification's descriptor for the tempo."""
        return "slow" if self.bpm < 90 else "moderate" if self.bpm < 125 else "fast"


def find_genre(text: str) -> Genre | None:
    lowered = text.lower()
    for genre in GENRES:
        if any(re.search(rf"(?<![a-z]){re.escape(alias)}(?![a-z])", lowered) for alias in genre.aliases):
            return genre
    return None


def find_bpm(text: str) -> float | None:
    match = _BPM.search(text)
    if match is None:
        return None
    return min(MAX_BPM, max(MIN_BPM, float(match.group(1) or match.group(2))))


def find_key(text: str) -> tuple[int, bool | None, str] | None:
    """(pitch class, minor or None when unsaid, spelled root) of the first key named, or None."""
    for match in _KEY.finditer(text):
        letter, accidental, mode = match["letter"], match["acc"], (match["mode"] or "").lower()
        if len(mode) < 2 and (letter.islower() or not (accidental or mode or match["ctx"])):
            continue
        accidental = {"\u266f": "#", "\u266d": "b"}.get(accidental, accidental)
        root = (_NOTE_INDEX[letter.upper()] + {"#": 1, "b": -1}.get(accidental, 0)) % 12
        minor = None if not mode else mode in ("m", "min", "minor")
        return root, minor, letter.upper() + accidental
    return None


def key_name(root: int, minor: bool) -> str:
    names = _SHARP_NAMES if root in (1, 6, 8) and minor else _FLAT_NAMES
    return f"{names[root]}{'m' if minor else ''}"


def parse_style(prompt: str, rng: np.random.Generator, default_bpm: float | None = None) -> Style:
    """The style a prompt asks for; what it leaves open comes from ``rng`` or the genre."""
    found = find_genre(prompt)
    genre = found or DEFAULT_GENRE
    moods = [_MOODS[w] for w in re.findall(r"[a-z]+", prompt.lower()) if w in _MOODS]
    factor = float(np.prod([m[0] for m in moods])) if moods else 1.0
    minor = next((m[1] for m in moods if m[1] is not None), genre.minor)
    drive = max((m[2] for m in moods), default=0.5)
    base = default_bpm if found is None and default_bpm is not None else genre.bpm
    bpm = find_bpm(prompt) or float(round(min(MAX_BPM, max(MIN_BPM, base * factor))))
    key = find_key(prompt)
    if key is None:
        root = int(rng.integers(12))
        return Style(genre, bpm, root, minor, key_name(root, minor), drive)
    root, said_minor, spelled = key
    minor = minor if said_minor is None else said_minor
    return Style(genre, bpm, root, minor, spelled + ("m" if minor else ""), drive)
