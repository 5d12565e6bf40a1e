"""Test inputs shared by the test files (never by the package).

EICAR is the industry's harmless anti-virus test file; it is kept encoded so
that a scanner on a developer's machine does not quarantine this source file.
"""

import base64
import hashlib

EICAR = base64.b64decode(
    "WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo="
)
EICAR_SHA256 = hashlib.sha256(EICAR).hexdigest()


def slow_rule(severity: str = "low") -> str:
    """A rule that is slow only on input starting with "SLOW": about 100 VM steps
    per byte. ``severity`` decides what a match costs under the default policy
    ("low" only warns, "high" blocks)."""
    return f"""
rule Sentinel_Test_Slow
{{
    meta:
        description = "test only: slow on crafted input"
        severity = "{severity}"
    condition:
        uint32(0) == 0x574F4C53 and
        for all i in (4..filesize - 1) : ( for all j in (0..99) : ( uint8(i) == 0x41 ) )
}}
"""


SLOW_RULE = slow_rule()
