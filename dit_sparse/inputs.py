"""Text files given on the command line (--prompts, --stats): checked before they are read, so that a binary file,
a device (/dev/zero) or a FIFO ends with one line naming the file, not a UnicodeDecodeError, a hang or a full
memory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_TEXT_BYTES = 1 << 30  # a prompt or statistics file is far smaller; beyond this it is the wrong file


class InputFileError(ValueError):
    """An input file that cannot be read as text: the message names the option and the file."""


def read_text_file(path: str | os.PathLike, option: str, what: str = "a text file",
                   max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of a regular file. Refuses, before reading, a missing file, a folder, a device, FIFO or
    socket, and a file over `max_bytes`; after reading, one that is not UTF-8 text (binary: invalid UTF-8 or NUL
    bytes). `what` says what the option takes ("a text file with one prompt per line")."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputFileError(f"{option}: {path} not found") from None
    except OSError as e:
        raise InputFileError(f"{option}: cannot read {path} ({os.strerror(e.errno) if e.errno else e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputFileError(f"{option}: {path} is a directory, not {what}")
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block, /dev/zero would fill the memory
        raise InputFileError(f"{option}: {path} is not a regular file (a device, pipe or socket); give {what}")
    if info.st_size > max_bytes:
        raise InputFileError(f"{option}: {path} is {info.st_size:,} bytes, too large for {what}; is it the right "
                             "file?")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputFileError(f"{option}: cannot read {path} ({os.strerror(e.errno) if e.errno else e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{option}: {path} is not a text file (not UTF-8 at byte {e.start}); give {what}") \
            from None
    if "\0" in text:
        raise InputFileError(f"{option}: {path} is not a text file (it holds NUL bytes); give {what}")
    return text
