"""Sampling: `spec` (what a program is compiled for), `requests` (what to draw, as arrays),
`program` (the one compiled sampling program), `generator` (`Generator`: model + mesh + programs),
`loras` (a request's LoRAs: named, loaded, applied at run time or merged), `exported` (lowered
programs and compiled code kept on disk), `batches` (prompt files, resumable, multi-host) and
`generate` (a generation config -> PNG files).

The names used most are importable from here: `from sdjax.sampling import Generator, Request,
SamplingSpec`. They load lazily, so importing the package (or `sdjax.sampling.spec`) stays free
of jax.
"""

from sdjax import lazy_exports

__getattr__ = lazy_exports(__name__, {
    "SamplingSpec": "sdjax.sampling.spec",
    "MODES": "sdjax.sampling.spec",
    "Request": "sdjax.sampling.requests",
    "Generator": "sdjax.sampling.generator",
    "NonFiniteLatentsError": "sdjax.sampling.generator",
    "enable_compilation_cache": "sdjax.sampling.exported",
})
