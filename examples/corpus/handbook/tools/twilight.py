"""Twilight times for Cerro Aldea, as used by the Night Desk planning sheet.

The summit site of Lumen Ridge Observatory is at latitude 30.41 degrees south, longitude 70.78
degrees west, 2,914 m above sea level. Astronomical twilight ends when the Sun is 18 degrees below
the horizon; science observations start then (see operations/night-operations.md).

This is a small, self-contained approximation (accurate to about two minutes), good enough for
planning; the telescope control system uses the full ephemeris.
"""

from __future__ import annotations

import math
from datetime import date

LATITUDE_DEG = -30.41
LONGITUDE_DEG = -70.78
ALTITUDE_M = 2914.0
#: Sun altitudes (degrees) that define the events of a night.
EVENTS = {"sunset": -0.833, "civil": -6.0, "nautical": -12.0, "astronomical": -18.0}


def solar_declination(day: date) -> float:
    """Declination of the Sun in degrees (Cooper's formula)."""
    n = day.timetuple().tm_yday
    return 23.44 * math.sin(math.radians(360.0 / 365.0 * (284 + n)))


def hour_angle(sun_altitude_deg: float, day: date) -> float:
    """Hour angle (degrees) at which the Sun reaches ``sun_altitude_deg`` on ``day``."""
    lat = math.radians(LATITUDE_DEG)
    dec = math.radians(solar_declination(day))
    alt = math.radians(sun_altitude_deg)
    cos_h = (math.sin(alt) - math.sin(lat) * math.sin(dec)) / (math.cos(lat) * math.cos(dec))
    if not -1.0 <= cos_h <= 1.0:
        raise ValueError(f"The Sun never reaches {sun_altitude_deg} degrees on {day}")
    return math.degrees(math.acos(cos_h))


def dark_hours(day: date) -> float:
    """Hours between the end of evening and the start of morning astronomical twilight."""
    return 24.0 - 2.0 * hour_angle(EVENTS["astronomical"], day) / 15.0


if __name__ == "__main__":
    for month in range(1, 13):
        d = date(2026, month, 15)
        print(f"{d}: {dark_hours(d):.1f} dark hours")
