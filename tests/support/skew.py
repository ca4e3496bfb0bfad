"""A producer process whose clock is off, for the tests of times the database's clock must set."""

from __future__ import annotations

#: Python source to run first in a ``python -c`` process (before dgxqueue is imported): every
#: datetime.now/utcnow and time.time in the process then reads ``float(sys.argv[2])`` seconds away
#: from the host's (and the database's) clock. ``sys.argv[1]`` is left for the database URL.
SKEW_PRELUDE = """
import datetime as _dt, sys, time
skew, Real = float(sys.argv[2]), _dt.datetime
class Skewed(Real):  # its times are Skewed too: libraries imported later check for this class
    @classmethod
    def _of(cls, real):
        return cls.combine(real.date(), real.timetz())
    @classmethod
    def now(cls, tz=None):
        return cls._of(Real.now(tz) + _dt.timedelta(seconds=skew))
    @classmethod
    def utcnow(cls):
        return cls._of(Real.utcnow() + _dt.timedelta(seconds=skew))
_real_time = time.time
time.time = lambda: _real_time() + skew
_dt.datetime = Skewed
"""
