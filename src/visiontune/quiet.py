"""Third-party log lines that are false alarms for visiontune, dropped by exact message (nothing else).

bitsandbytes (0.49-0.50) logs at import time, on CPUs with AVX-512 BF16 and without the optional ``kernels``
package: "Failed to load CPU gemm_4bit_forward from kernels-community ...". peft imports bitsandbytes whenever
it is installed, so every method printed it, ``lora`` and ``linear`` included. The kernel in question serves
bitsandbytes' repacked CPU layout for 4-bit weights, which visiontune switches off for every 4-bit layer it
builds (:func:`visiontune.methods.nf4.keep_portable_4bit_layout`): the message is about a kernel visiontune
never calls, and there is nothing for a user to do. Other bitsandbytes messages pass through unchanged.
"""

from __future__ import annotations

import logging

_DROPPED = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def install() -> None:
    """Attach the filters (idempotent); must run before the library logs, i.e. before peft is imported."""
    for name, prefixes in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))
