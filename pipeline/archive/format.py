"""The format's fixed names, sizes and markers (docs/archive-format.md)."""

from __future__ import annotations

import re

FORMAT = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
PAYLOAD = "payload"  # the payload's folder inside the archive

MAX_MANIFEST_BYTES = 64 * 2**20
MAX_SIGNATURE_BYTES = 4096
MAX_EXTENDED_HEADER_BYTES = 64 * 2**10
ANNOUNCE_READ_BYTES = 64 * 2**10
RATIO_GRACE_BYTES = 2**20  # the expansion ratio is judged once this much has been produced

BLOCK = 512  # a tar block
CHUNK = 2**20  # the reader's read and inflate size
GZIP_MAGIC = b"\x1f\x8b"
ANNOUNCED = re.compile(rb'^\{\s*"length"\s*:\s*(\d{1,20})\s*[,}]')
